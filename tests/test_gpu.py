"""The GPU tier (`make test-gpu`): what only a CUDA machine shows. Every test here is marked `gpu`, which
`make test` deselects, and skips with its reason where CUDA is not available."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import SMOKE, run_dlfs
from test_resume import interrupt_at_step

from dlfs_cli import trainer as trainer_module
from dlfs_cli.evaluate import evaluate_run
from dlfs_cli.train import train
from dlfs_cli.trainer import Diverged, Interrupted, Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: this machine has no CUDA device"),
]

CUDA = [*(a for a in SMOKE if not a.startswith("device=")), "device=cuda", "figures.enabled=false"]
LSTM = ["model=lstm_charmodel", "model.hidden_size=32", "data.sequence_length=16"]
MODELS = {
    "boston": [],
    "mnist_cnn": ["model=mnist_cnn", "data=digits"],
    "autoencoder": ["model=autoencoder", "data=digits"],
    "lstm_charmodel": LSTM,
}


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def finite(metrics: dict[str, float]) -> bool:
    return bool(metrics) and all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("model", MODELS)
def test_the_four_models_train_on_cuda(make_cfg, tmp_path: Path, model: str) -> None:
    metrics = train(make_cfg(*MODELS[model], *CUDA), tmp_path / "run")
    s = summary(tmp_path / "run")
    assert s["status"] == "completed" and s["device"].startswith("cuda") and finite(metrics)


def test_train_eval_and_generate_on_cuda_through_the_cli(tmp_path: Path) -> None:
    out = run_dlfs("train", *LSTM, *CUDA, "hydra.run.dir=run", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_dlfs("eval", "run=run", cwd=tmp_path)  # on the run's device: the same numbers again
    assert out.returncode == 0 and "yes" in out.stdout and "NO" not in out.stdout, out.stdout + out.stderr
    out = run_dlfs("generate", "run=run", "length=80", "seed=3", cwd=tmp_path)
    assert out.returncode == 0 and len(out.stdout.strip()) >= 80, out.stderr
    out = run_dlfs("eval", "run=run", "device=cpu", cwd=tmp_path)  # a CUDA run's checkpoint on the CPU
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("overrides", "stop_at"),
    [
        (["model=mnist_cnn", "data=digits"], 13),  # dropout draws from the GPU's generator
        (LSTM, 7),  # cuDNN's LSTM and the carried state
    ],
    ids=["cnn-digits", "lstm"],
)
def test_exact_resume_on_cuda(make_cfg, tmp_path: Path, monkeypatch, overrides: list[str], stop_at: int) -> None:
    """trainer.deterministic=true: interrupted and resumed reaches bit for bit the weights of the straight run."""
    from dlfs_cli.resume import prepare

    overrides = [*overrides, *CUDA, "trainer.deterministic=true", "trainer.limit_batches=10"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(make_cfg(*overrides), straight)
    with monkeypatch.context() as m:
        interrupt_at_step(m, stop_at)
        with pytest.raises(Interrupted):
            train(make_cfg(*overrides), broken)
    cfg, state = prepare(make_cfg(f"resume={broken}"), [f"resume={broken}"], broken)
    train(cfg, broken, state)
    assert summary(broken)["status"] == "completed"
    assert summary(straight)["metrics"] == summary(broken)["metrics"]
    a, b = weights(straight), weights(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=mnist_cnn", "data=digits", "trainer.precision=bf16", "trainer.channels_last=true"],
        ["model=autoencoder", "data=digits", "trainer.channels_last=true"],
        [*LSTM, "trainer.precision=bf16"],
    ],
    ids=["cnn-bf16-channels-last", "autoencoder-channels-last", "lstm-bf16"],
)
def test_bf16_and_channels_last_on_cuda(make_cfg, tmp_path: Path, overrides: list[str]) -> None:
    metrics = train(make_cfg(*overrides, *CUDA), tmp_path / "run")
    assert summary(tmp_path / "run")["status"] == "completed" and finite(metrics)
    recomputed = evaluate_run(tmp_path / "run")["recomputed"]  # dlfs eval uses the run's precision and layout
    assert all(math.isclose(recomputed[k], v, rel_tol=1e-6) for k, v in metrics.items()), (recomputed, metrics)


# Data parallel: NCCL needs a GPU per rank (trainer.nproc=N device=cuda); on one GPU two ranks share it
# over gloo, which carries CUDA tensors too, with the same trainer code and CUDA loss sums.
DDP = ["model.dropout_keep=1.0", "trainer.log_every=2", "trainer.checkpoint_every=5", *CUDA]
RANK_SCRIPT = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

import dlfs_cli.distributed as distributed
import dlfs_cli.train as train_module
from dlfs_cli.config import conf_dir, register_configs

torch.cuda.set_device(0)
dist.init_process_group("gloo")  # before dlfs asks for "cpu:gloo,cuda:nccl"
distributed.resolve_device = lambda name, local_rank=None: torch.device("cuda:0")  # both ranks on the one GPU
register_configs()
with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
    cfg = compose(config_name="train", overrides=sys.argv[2:])
train_module.train(cfg, Path(sys.argv[1]), live=False)
dist.barrier()
dist.destroy_process_group()
"""


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason=f"NCCL needs one GPU per rank: this machine has {torch.cuda.device_count()} (see the gloo test below)",
)
def test_two_ranks_with_nccl_train_as_one_process(make_cfg, tmp_path: Path) -> None:
    out = run_dlfs("train", *DDP, "trainer.nproc=2", "hydra.run.dir=run", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert summary(tmp_path / "run")["world_size"] == 2 and summary(tmp_path / "run")["status"] == "completed"
    train(make_cfg(*DDP), tmp_path / "single")
    assert_same_weights(weights(tmp_path / "run"), weights(tmp_path / "single"))


def test_two_ranks_sharing_one_gpu_over_gloo_train_as_one_process(make_cfg, tmp_path: Path) -> None:
    """The multi-GPU bookkeeping (CUDA loss sums, host counts, one collective) on the GPU there is."""
    import subprocess

    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    out = subprocess.run([*cmd, str(tmp_path / "run"), *DDP], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    s = summary(tmp_path / "run")
    assert s["world_size"] == 2 and s["status"] == "completed"
    train(make_cfg(*DDP), tmp_path / "single")
    assert_same_weights(weights(tmp_path / "run"), weights(tmp_path / "single"))
    assert s["metrics"]["test_loss"] == pytest.approx(summary(tmp_path / "single")["metrics"]["test_loss"], rel=1e-4)


def test_a_joblib_sweep_on_cuda(tmp_path: Path) -> None:
    out = run_dlfs(
        "train", "-m", "seed=1,2", *CUDA, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweep.dir=sweep",
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for job in ("0", "1"):
        s = summary(tmp_path / "sweep" / job)
        assert s["status"] == "completed" and s["device"].startswith("cuda")


def test_divergence_on_cuda_names_the_step(make_cfg, tmp_path: Path) -> None:
    """On a GPU the NaN is found from the device-side flag at the next log or save point."""
    with pytest.raises(Diverged, match=r"at step \d+ \(epoch \d\)"):
        train(make_cfg(*CUDA, "optimizer.lr=1e6", "model.activation=none"), tmp_path / "run")
    assert summary(tmp_path / "run")["status"] == "diverged"


SYNC_POINTS = ("_record_train", "_save", "_evaluate", "_check_divergence", "_end_epoch")


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=mnist_cnn", "data=digits"],
        ["model=autoencoder", "data=digits", "trainer.precision=bf16"],
        [*LSTM, "data.batching=book"],
        [*LSTM, "data.batching=streams"],
        ["optimizer=adam"],  # Boston: its rows held on the GPU (DeviceRows), Adam's step counts
        # the book's DataLoader: batches from pinned host memory, copied without waiting
        ["model=mnist_cnn", "data=mnist", "data.root={mnist_root}", "data.pipeline=torchvision"],
    ],
    ids=["cnn", "autoencoder-bf16", "lstm-book", "lstm-streams", "boston-adam", "mnist-dataloader"],
)
def test_training_steps_never_wait_for_the_gpu(
    make_cfg, tmp_path: Path, mnist_root: Path, monkeypatch, overrides: list[str]
) -> None:
    """torch.cuda.set_sync_debug_mode("error") from the end of the first step (cuDNN's and cuBLAS's set-up)
    to the end of training, except inside the log, save and evaluation points, which read numbers on purpose:
    the data, forward, backward, optimizer step and accounting of every other step run without a host sync."""

    def allowed(method):
        def run(self, *args, **kwargs):
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return method(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(mode)

        return run

    for name in SYNC_POINTS:
        monkeypatch.setattr(Trainer, name, allowed(getattr(Trainer, name)))
    after_step, fit = Trainer._after_step, Trainer.fit

    def audited_after_step(self, *args):
        torch.cuda.set_sync_debug_mode("error")  # from the end of the first step on
        after_step(self, *args)

    def audited_fit(self, *args, **kwargs):
        try:
            return fit(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(Trainer, "_after_step", audited_after_step)
    monkeypatch.setattr(Trainer, "fit", audited_fit)
    monkeypatch.setattr(trainer_module, "PENDING_STEPS", 4)  # the buffer's folds happen inside the audit too
    overrides = [o.format(mnist_root=mnist_root) for o in overrides]
    cfg = make_cfg(*overrides, *CUDA, "trainer.limit_batches=12", "trainer.log_every=5", "trainer.checkpoint_every=7")
    metrics = train(cfg, tmp_path / "run", live=False)  # a live progress bar reads the loss on purpose
    assert finite(metrics) and summary(tmp_path / "run")["status"] == "completed"
