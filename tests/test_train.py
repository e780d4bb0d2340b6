"""train(cfg, run_dir) end to end on the bundled Boston data: the run-folder contract and the loop."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import RUN_FILES, SMOKE

from dlfs_cli.config import DlfsError
from dlfs_cli.evaluate import evaluate_run
from dlfs_cli.train import train

# for the runs whose figures no test here looks at (test_run_folder_contract does): drawing them is most of a
# small run's time
NO_FIGURES = ["figures.enabled=false"]


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_run_folder_contract(make_cfg, tmp_path: Path) -> None:
    run = tmp_path / "run"
    metrics = train(make_cfg(*SMOKE, "seed=7"), run)

    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert [p.name for p in (run / "figures").iterdir()] == ["loss_curves.png"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["epochs"] == 2 and config["model"]["activation"] == "sigmoid"

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["model"] == "boston" and summary["seed"] == 7 and summary["device"] == "cpu"
    assert summary["epochs_completed"] == 2 and summary["world_size"] == 1
    assert summary["duration_s"] > 0
    assert set(summary["metrics"]) == {f"{s}_{m}" for s in ("val", "test") for m in ("loss", "mse", "rmse", "mae")}
    assert summary["metrics"] == metrics
    assert metrics["test_rmse"] == pytest.approx(metrics["test_mse"] ** 0.5)
    assert set(summary["versions"]) >= {"python", "torch", "dlfs", "git"}

    rows = read_metrics(run)
    assert list(rows[0]) == ["epoch", "step", "split", "lr", "loss", "mse", "rmse", "mae", "elapsed_s"]
    assert [(r["epoch"], r["step"], r["split"]) for r in rows] == [
        ("1", "3", "train"),
        ("1", "3", "val"),
        ("2", "6", "train"),
        ("2", "6", "val"),
        ("2", "6", "test"),
    ]  # limit_batches=3: three steps per epoch; the validation split each epoch, the test split after the last
    assert float(rows[-1]["mse"]) == pytest.approx(metrics["test_mse"], rel=1e-5)

    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / "checkpoints" / name, weights_only=True)
        assert {"model", "optimizer", "scheduler", "epoch", "config", "step", "metrics"} <= set(ckpt)
        assert ckpt["config"]["seed"] == 7 and "seed" not in ckpt["config"]["trainer"]  # one seed key
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    assert "completed" in (run / "train.log").read_text()
    # best.pt: the epoch of the lowest validation loss, recorded in summary.json
    val = [(float(r["loss"]), int(r["epoch"])) for r in rows if r["split"] == "val"]
    best_loss, best_epoch = min(val)
    assert summary["best"]["epoch"] == best_epoch and summary["best"]["val_loss"] == pytest.approx(best_loss, rel=1e-5)
    assert torch.load(run / "checkpoints" / "best.pt", weights_only=True)["epoch"] == best_epoch


def test_best_pt_is_chosen_on_the_validation_loss_never_on_the_test_loss(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """Validation losses made to fall to a minimum at epoch 2 and test losses at epoch 4: best.pt is epoch 2."""
    from dlfs_cli import trainer as trainer_module

    real, calls = trainer_module.evaluate, {"val": 0, "test": 0}
    shapes = {"val": [5.0, 1.0, 3.0, 4.0, 6.0], "test": [5.0, 4.0, 3.0, 1.0, 2.0]}

    def fake(*args, **kwargs):
        metrics, split = real(*args, **kwargs), kwargs.get("split", args[8] if len(args) > 8 else "test")
        metrics[f"{split}_loss"] = shapes[split][calls[split]]
        calls[split] += 1
        return metrics

    monkeypatch.setattr(trainer_module, "evaluate", fake)
    run = tmp_path / "run"
    train(make_cfg(*SMOKE, *NO_FIGURES, "trainer.epochs=5", "trainer.test_every_eval=true"), run)
    assert json.loads((run / "summary.json").read_text())["best"]["epoch"] == 2
    assert torch.load(run / "checkpoints" / "best.pt", weights_only=True)["epoch"] == 2


def test_early_stopping_ends_a_completed_run_and_a_resume_respects_it(make_cfg, tmp_path: Path) -> None:
    """patience 2 with a min_delta no improvement can reach: the first evaluation sets the best, the next two
    do not beat it by min_delta, so the run stops after epoch 3 of 8, completed, and says where and why."""
    from dlfs_cli.resume import prepare

    run = tmp_path / "run"
    stop = ["trainer.early_stopping.patience=2", "trainer.early_stopping.min_delta=1e9"]
    metrics = train(make_cfg(*SMOKE, *NO_FIGURES, "trainer.epochs=8", *stop), run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    assert summary["stopped_early"]["epoch"] == 3 and "2 evaluations" in summary["stopped_early"]["reason"]
    assert [r["epoch"] for r in read_metrics(run) if r["split"] == "test"] == ["3"]  # the report, at the stop
    assert set(metrics) >= {"val_loss", "test_loss"}
    more = ["trainer.epochs=10"]  # a resume asking for more epochs: the run stays stopped
    resumed = prepare(make_cfg(f"resume={run}", *more), [f"resume={run}", *more], run)
    assert resumed is not None
    cfg, state = resumed
    assert train(cfg, run, state) == metrics
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 3


def test_grad_clip_norm_bounds_every_steps_gradient(make_cfg, tmp_path: Path, monkeypatch) -> None:
    norms: list[float] = []
    step = torch.optim.SGD.step

    def record(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", record)
    train(make_cfg(*SMOKE, *NO_FIGURES), tmp_path / "free")
    assert max(norms) > 10  # Boston's squared errors in $1000s: large gradients at first
    norms.clear()
    train(make_cfg(*SMOKE, *NO_FIGURES, "trainer.grad_clip_norm=0.5"), tmp_path / "clipped")
    assert norms and max(norms) <= 0.5 * (1 + 1e-5)


def test_checkpoint_reproduces_the_final_metrics_in_a_fresh_process(make_cfg, tmp_path: Path) -> None:
    run = tmp_path / "run"
    metrics = train(make_cfg("trainer.epochs=3", "device=cpu", "model.dropout_keep=0.8", *NO_FIGURES), run)
    script = f"""
import json, sys, torch
from omegaconf import OmegaConf
from dlfs_cli.data import build_data
from dlfs_cli.models import build_model
ckpt = torch.load({str(run / "checkpoints" / "last.pt")!r}, weights_only=True)
cfg = OmegaConf.create(ckpt["config"])
data = build_data(cfg.data, cfg.trainer.batch_size, cfg.seed)
model = build_model(cfg.model, data.info)
model.load_state_dict(ckpt["model"])
model.eval()
X, y = data.test.dataset.tensors
with torch.no_grad():
    print(json.dumps({{"mse": ((model(X) - y) ** 2).mean().item()}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["mse"] == pytest.approx(metrics["test_mse"], rel=1e-5)


def test_same_seed_same_numbers_other_seed_other_numbers(make_cfg, tmp_path: Path) -> None:
    a = train(make_cfg(*SMOKE, *NO_FIGURES, "model.dropout_keep=0.8"), tmp_path / "a")
    b = train(make_cfg(*SMOKE, *NO_FIGURES, "model.dropout_keep=0.8"), tmp_path / "b")
    c = train(make_cfg(*SMOKE, *NO_FIGURES, "model.dropout_keep=0.8", "seed=1"), tmp_path / "c")
    assert a == b and a != c


@pytest.mark.parametrize(
    "overrides",
    [
        ["optimizer=adam"],
        ["optimizer=sgd", "optimizer.nesterov=true", "optimizer.weight_decay=1e-4"],
        ["scheduler=step", "scheduler.step_size=1"],
        ["scheduler=cosine"],
        ["scheduler=exponential", "scheduler.gamma=0.5"],
    ],
    ids=lambda o: " ".join(o),
)
def test_optimizers_and_schedulers_train(make_cfg, tmp_path: Path, overrides: list[str]) -> None:
    metrics = train(make_cfg(*SMOKE, *NO_FIGURES, *overrides), tmp_path / "run")
    assert metrics["test_loss"] > 0


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # StepLR: halved after every epoch
        (["scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5"], [0.01, 0.005, 0.0025]),
        # CosineAnnealingLR over the 3 epochs: lr_e = eta_min + (lr - eta_min) (1 + cos(pi e / 3)) / 2
        (["scheduler=cosine", "scheduler.eta_min=0.001"], [0.01, 0.001 + 0.009 * 0.75, 0.001 + 0.009 * 0.25]),
        (["scheduler=none"], [0.01, 0.01, 0.01]),
    ],
    ids=["step", "cosine", "none"],
)
def test_each_scheduler_sets_the_learning_rate_of_each_epoch(
    make_cfg, tmp_path: Path, overrides: list[str], expected: list[float]
) -> None:
    """The learning rate each epoch trained with, as metrics.csv records it: a scheduler that was never
    stepped, or never built, would leave 0.01 in every epoch (the smoke tests above only see a loss)."""
    run = tmp_path / "run"
    train(make_cfg(*SMOKE, *NO_FIGURES, "trainer.epochs=3", "optimizer.lr=0.01", *overrides), run)
    by_epoch = {int(r["epoch"]): float(r["lr"]) for r in read_metrics(run) if r["split"] == "train"}
    assert [by_epoch[e] for e in (1, 2, 3)] == pytest.approx(expected)


def test_weights_gone_nan_after_the_last_step_are_divergence_and_never_saved(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training losses were all finite, then the weights are NaN when the held-out split is measured (an
    overflow in the last update): the run is diverged, and no checkpoint holds the NaN weights."""
    import dlfs_cli.trainer

    real = dlfs_cli.trainer.evaluate

    def poisoned(net, *args, **kwargs):
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(math.nan)
        return real(net, *args, **kwargs)

    monkeypatch.setattr(dlfs_cli.trainer, "evaluate", poisoned)
    run = tmp_path / "run"
    with pytest.raises(DlfsError, match="diverged"):
        train(make_cfg(*SMOKE, *NO_FIGURES, "trainer.epochs=1"), run)
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"
    for path in (run / "checkpoints").glob("*.pt"):
        weights = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(w).all() for w in weights.values()), path


def test_the_books_exponential_decay_reaches_final_lr_in_the_last_epoch(make_cfg, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(
        make_cfg(
            *SMOKE,
            *NO_FIGURES,
            "trainer.epochs=4",
            "optimizer.lr=0.01",
            "scheduler=exponential",
            "scheduler.final_lr=0.001",
        ),
        run,
    )
    lrs = [float(r["lr"]) for r in read_metrics(run) if r["split"] == "train"]
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.001)
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == 4


def test_eval_every_and_zero_epochs(make_cfg, tmp_path: Path) -> None:
    train(make_cfg(*SMOKE, *NO_FIGURES, "trainer.epochs=5", "trainer.eval_every=2"), tmp_path / "a")
    rows = read_metrics(tmp_path / "a")
    assert [r["epoch"] for r in rows if r["split"] == "val"] == ["2", "4", "5"]
    assert [r["epoch"] for r in rows if r["split"] == "test"] == ["5"]  # once, for the report
    train(make_cfg(*SMOKE, *NO_FIGURES, "trainer.epochs=3", "trainer.test_every_eval=true"), tmp_path / "c")
    rows = read_metrics(tmp_path / "c")
    assert [r["epoch"] for r in rows if r["split"] == "test"] == [r["epoch"] for r in rows if r["split"] == "val"]
    book = make_cfg(*SMOKE, *NO_FIGURES, "trainer.epochs=5", "trainer.eval_every=2", "data.val_fraction=0")
    train(book, tmp_path / "book")  # no validation split: the evaluations are of the test split, as the book's
    rows = read_metrics(tmp_path / "book")
    assert [r["epoch"] for r in rows if r["split"] == "test"] == ["2", "4", "5"]
    assert "val" not in {r["split"] for r in rows}
    assert not (tmp_path / "book" / "checkpoints" / "best.pt").exists()  # nothing to choose it on
    with pytest.raises(DlfsError, match=r"no checkpoints/best.pt: .*data.val_fraction=0.*checkpoint=last"):
        evaluate_run(tmp_path / "book", "best")
    metrics = train(make_cfg("trainer.epochs=0", "device=cpu", *NO_FIGURES), tmp_path / "b")
    assert metrics["test_mse"] > 100 and metrics["val_mse"] > 100  # an untrained model on prices in $1000s
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "completed"


def test_divergence_stops_the_run_and_says_so(make_cfg, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(DlfsError, match="diverged.*lower optimizer.lr"):
        train(make_cfg(*SMOKE, "optimizer.lr=1e4", "model.activation=none"), run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and "diverged" in summary["error"]


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
            "to allocate 2684354560 bytes. Error code 12 (Cannot allocate memory)"
        ),
        MemoryError(),
    ],
    ids=["torch-cpu-allocator", "python"],
)
def test_running_out_of_memory_is_one_line_and_a_failed_run(
    run_here, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    """Out of memory in a training step (a vocabulary of 20,000 characters under a memory limit) was torch's
    traceback, twice: it is the sizes' doing, said in one line, and the run is recorded failed with it."""
    from dlfs_cli.trainer import Trainer

    def short_of_memory(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(Trainer, "fit", short_of_memory)
    out = run_here("train", *SMOKE, "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout, out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith("dlfs: error: out of memory on cpu (") and "try a smaller trainer.batch_size" in line
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("out of memory on cpu")
    # before the run's folder has its files: building the data (a text's indices on the device) or the model
    import dlfs_cli.train

    monkeypatch.setattr(dlfs_cli.train, "build_data", short_of_memory)
    out = run_here("train", *SMOKE, "hydra.run.dir=early", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout, out.stderr
    assert out.stderr.startswith("dlfs: error: out of memory on cpu (") and len(out.stderr.splitlines()) == 1
    assert not (tmp_path / "early").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused_before_anything_is_written(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(DlfsError, match="CUDA is not available"):
        train(make_cfg("device=cuda"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _watch_model(monkeypatch) -> dict[str, object]:
    """Record what the first convolution sees and makes, through the model that train() builds."""
    import dlfs_cli.train as train_module

    seen: dict[str, object] = {}
    build = train_module.build_model

    def build_and_watch(cfg, info):
        model = build(cfg, info)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))

        def hook(module, inputs, output):
            if module.training:
                seen["input_channels_last"] = inputs[0].is_contiguous(memory_format=torch.channels_last)
                seen["output_dtype"] = output.dtype

        conv.register_forward_hook(hook)
        seen["model"] = model
        return model

    monkeypatch.setattr(train_module, "build_model", build_and_watch)
    return seen


DIGITS_SMOKE = ["model=mnist_cnn", "data=digits", "trainer.epochs=1", "trainer.limit_batches=3", "device=cpu"]


def test_precision_bf16_runs_the_forward_pass_in_bfloat16(make_cfg, tmp_path: Path, monkeypatch) -> None:
    seen = _watch_model(monkeypatch)
    metrics = train(make_cfg(*DIGITS_SMOKE, "trainer.precision=bf16"), tmp_path / "run")
    assert seen["output_dtype"] == torch.bfloat16 and math.isfinite(metrics["test_loss"])
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert all(w.dtype == torch.float32 for w in state["model"].values())  # the weights stay float32
    plain = _watch_model(monkeypatch)
    train(make_cfg(*DIGITS_SMOKE), tmp_path / "plain")
    assert plain["output_dtype"] == torch.float32  # the default is the book's float32


def test_channels_last_lays_the_convolutions_out_nhwc(make_cfg, tmp_path: Path, monkeypatch) -> None:
    seen = _watch_model(monkeypatch)
    train(make_cfg(*DIGITS_SMOKE, "trainer.channels_last=true"), tmp_path / "run")
    conv = next(m for m in seen["model"].modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and seen["input_channels_last"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_cudnn_benchmark_is_left_alone_off_cuda(make_cfg, tmp_path: Path) -> None:
    train(make_cfg(*SMOKE, *NO_FIGURES, "trainer.cudnn_benchmark=true"), tmp_path / "run")
    assert torch.backends.cudnn.benchmark is False  # a CUDA switch: nothing to do on the CPU


def test_compile_without_a_cpp_compiler_is_one_line_before_the_run(
    run_here, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile looks for its C++ compiler at the first step: a machine without one ended the run there,
    with inductor's long traceback and a failed run folder. Now one line, exit 2, and no folder."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    out = run_here("train", *SMOKE, "trainer.compile=true", "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("dlfs: error: trainer.compile=true: torch.compile found no C++ compiler")
    assert "install one (g++, or name it in $CXX) or leave trainer.compile=false" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compile_trains_and_saves_plain_weights(make_cfg, tmp_path: Path) -> None:
    metrics = train(make_cfg(*DIGITS_SMOKE, "trainer.compile=true"), tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert math.isfinite(metrics["test_loss"]) and not any("_orig_mod" in k for k in state["model"])
