"""Every device, checked on a CPU: the bookkeeping that runs on CUDA, several GPUs and Apple's MPS,
driven on PyTorch's `meta` device (tensors with a device and a dtype but no data) and with fakes for
the GPU calls, so that a mistake that only a GPU machine would show fails here (issue 15)."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import SMOKE, run_dlfs
from hydra.types import RunMode
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader

from dlfs_cli import distributed, layers, sweep
from dlfs_cli import train as train_module
from dlfs_cli import trainer as trainer_module
from dlfs_cli.checkpoint import capture_rng, restore_rng
from dlfs_cli.config import TrainerConfig
from dlfs_cli.data import boston, build_data
from dlfs_cli.data.text import BookBatches
from dlfs_cli.distributed import SINGLE, World
from dlfs_cli.errors import DlfsError
from dlfs_cli.layers import LSTMLayer, cpu_has_bf16_lstm
from dlfs_cli.tracking import ProgressDisplay, RunFolder
from dlfs_cli.trainer import PENDING_STEPS, RunningLoss, Trainer, evaluate, sum_dtype

META = torch.device("meta")


@dataclass(frozen=True)
class TwoRanks(World):
    """Rank 0 of two, with the collective faked: it takes one tensor, which must be on the training
    device (NCCL carries CUDA tensors only), and answers with ones on the host (meta tensors hold no numbers)."""

    device: torch.device = META

    def sum(self, values: Tensor) -> Tensor:
        assert values.device == self.device, f"a collective got a tensor on {values.device}, not {self.device}"
        return torch.ones(values.shape, dtype=values.dtype)


class DeviceLog(TorchDispatchMode):
    """Every operation that runs while active: its name, whether its tensors span several devices (an
    implicit copy between host and device), and the float64 tensors it made on the device under test."""

    def __init__(self, device: torch.device = META) -> None:
        super().__init__()
        self.device = device
        self.ops: list[str] = []
        self.mixed: list[str] = []
        self.float64: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        self.ops.append(name)
        devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.dim() > 0}
        if len(devices) > 1:
            self.mixed.append(name)
        made = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        if any(t.device == self.device and t.dtype == torch.float64 for t in made):
            self.float64.append(name)
        return out


def meta_trainer(world: World, loss_name: str = "mse") -> Trainer:
    model = nn.Linear(3, 1, device=META)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(model, optimizer, None, TrainerConfig(), loss_name, META, run=None, identity={}, world=world)


# 1. the loss sums of several GPUs ---------------------------------------------------------------


def test_the_sums_over_ranks_go_to_the_collective_on_the_training_device() -> None:
    """Under torchrun on GPUs the loss sum lives on the GPU and the target count on the host: the collective
    must get one tensor on the GPU (torch.stack refused the mix at every run's first log point)."""
    world = TwoRanks(0, 2)
    running = RunningLoss(META)
    running.add(torch.ones((), device=META), 4, 1)
    with DeviceLog() as log:
        assert running.take_window(world) == 1.0
        sums = running.state_dict(world)
    assert sums == {"epoch": 1.0, "epoch_n": 1, "window": 1.0, "window_n": 1}  # the fake collective's ones
    assert not log.mixed


# 2. no float64 where the device has none (Apple's MPS) --------------------------------------------


def test_the_sum_dtype_policy() -> None:
    assert sum_dtype(torch.device("mps")) == torch.float32
    assert sum_dtype(torch.device("cuda")) == sum_dtype(torch.device("cpu")) == torch.float64


def test_training_and_evaluation_make_no_float64_on_a_device_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The meta device plays MPS: the trainer's sums, its per-step accounting, the gathering of the sums and
    evaluate's sums all follow sum_dtype, so no float64 tensor is ever made on the device."""
    for module in (trainer_module, distributed):
        monkeypatch.setattr(module, "sum_dtype", lambda device: torch.float32)
    world = TwoRanks(0, 2)
    with DeviceLog() as log:
        trainer = meta_trainer(world)
        trainer.running.add(torch.ones((), device=META), 4, 1)
        trainer.running.take_window(world)
        trainer.running.state_dict(world)
        batches = [(torch.randn(8, 3), torch.randn(8, 1))]
        metrics = evaluate(trainer.net, batches, "mse", META, world=world)
    assert not log.float64, f"float64 made on the device by {log.float64}"
    assert set(metrics) == {"test_loss", "test_mse", "test_rmse", "test_mae"}


# 3. random number generators: fewer GPUs, no CUDA start for a CPU run, MPS ---------------------------


def test_resuming_with_fewer_gpus_sets_only_the_gpus_that_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint saved where 2 GPUs were visible, resumed where there is 1: restoring the second GPU's
    generator was an error (invalid device ordinal), yet resume promises any process count."""
    state = capture_rng()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    restored = []

    def set_rng_state(new_state: Tensor, device: int | str = "cuda") -> None:
        index = device if isinstance(device, int) else (torch.device(device).index or 0)
        if index >= 1:
            raise RuntimeError("CUDA error: invalid device ordinal")
        restored.append((index, new_state))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    restore_rng(state)
    assert len(restored) == 1 and restored[0][0] == 0 and torch.equal(restored[0][1], state["cuda"][0])


def test_a_resume_on_another_gpu_continues_the_training_gpus_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep's job 1 trained on GPU 1; resumed alone it trains on GPU 0, whose saved generator was only
    ever seeded: restoring by index alone gave its dropout masks that state, not the one that trained."""
    states = {0: torch.zeros(16, dtype=torch.uint8), 1: torch.ones(16, dtype=torch.uint8)}  # GPU 1's advanced
    now: dict[int, Tensor] = {}

    def index_of(device: int | str | torch.device) -> int:
        return device if isinstance(device, int) else (torch.device(device).index or 0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [states[0], states[1]])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": now.__setitem__(index_of(device), s))
    state = capture_rng(torch.device("cuda:1"))  # the job, training on GPU 1
    restore_rng(state, torch.device("cuda"))  # resumed alone: GPU 0
    assert torch.equal(now[0], states[1])  # GPU 0 draws on from where GPU 1 stopped
    del state["cuda_training"]  # a checkpoint from before: each GPU its own, by index
    restore_rng(state, torch.device("cuda"))
    assert torch.equal(now[0], states[0]) and torch.equal(now[1], states[1])


def test_a_cpu_run_does_not_start_cuda_to_save_its_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    """device=cpu on a GPU machine: CUDA was never used, so its generators are not asked for (asking
    starts CUDA: seconds, and memory on the GPU, in every checkpoint of a CPU run)."""

    def starts_cuda() -> list[Tensor]:
        raise AssertionError("capture_rng started CUDA in a run that never used it")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", starts_cuda)
    assert capture_rng()["cuda"] == [] and capture_rng(torch.device("cpu"))["cuda"] == []


def test_the_mps_generator_is_saved_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout on an Apple GPU draws from the MPS generator: without it a resume there is not exact."""
    saved = torch.arange(8, dtype=torch.uint8)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda *args: saved.clone())
    state = capture_rng(torch.device("mps"))
    assert torch.equal(state["mps"], saved)
    assert capture_rng(torch.device("cpu"))["mps"] is None  # only when training there
    restored = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda new_state, *args: restored.append(new_state))
    restore_rng(state)
    assert len(restored) == 1 and torch.equal(restored[0], saved)
    del state["mps"]  # a checkpoint from before the MPS generator was saved
    restore_rng(state)
    assert len(restored) == 1


# 11. bfloat16 on Apple's MPS: newer torch and macOS than the floor -------------------------------------

OLD_TORCH_AUTOCAST = {
    # torch < 2.5: no MPS autocast at all
    "refused": RuntimeError("User specified an unsupported autocast device_type 'mps'"),
    # torch 2.5: MPS autocast in float16 only; it warns and trains in float32
    "disabled": UserWarning(
        "In MPS autocast, but the target dtype is not supported. Disabling autocast.\n"
        "MPS Autocast only supports dtype of torch.float16 currently."
    ),
}


@pytest.mark.parametrize("behaviour", OLD_TORCH_AUTOCAST)
def test_bf16_on_mps_without_its_autocast_is_refused_before_the_run(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behaviour: str
) -> None:
    """The floor (torch 2.3) has no bfloat16 autocast on MPS: a run with precision=bf16 there crashed in
    its first step (torch < 2.5) or trained in float32 under a bf16 label (2.5). Now one line, no folder."""
    real_autocast = torch.autocast

    def old_autocast(device_type: str, *args, **kwargs):
        if device_type == "mps":
            problem = OLD_TORCH_AUTOCAST[behaviour]
            if isinstance(problem, Warning):
                warnings.warn(str(problem), UserWarning, stacklevel=2)
            else:
                raise problem
        return real_autocast(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", old_autocast)
    monkeypatch.setattr(distributed, "resolve_device", lambda name, local_rank=None: torch.device("mps"))
    with pytest.raises(DlfsError, match=r"^trainer.precision=bf16: no bfloat16 autocast on mps with torch .*fp32"):
        train_module.train(make_cfg("trainer.precision=bf16"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert train_module._set_up(make_cfg(), None)[1].type == "mps"  # fp32 asks nothing of autocast


def test_dlfs_eval_of_a_bf16_run_on_mps_without_its_autocast_is_refused(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dlfs eval measures a run as it was measured, under bfloat16 autocast: on a device without it, one line."""
    from dlfs_cli import evaluate as evaluate_module

    train_module.train(make_cfg(*SMOKE, "trainer.precision=bf16", "figures.enabled=false"), tmp_path / "run")
    real_autocast = torch.autocast

    def old_autocast(device_type: str, *args, **kwargs):
        if device_type == "mps":
            raise OLD_TORCH_AUTOCAST["refused"]
        return real_autocast(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", old_autocast)
    monkeypatch.setattr(evaluate_module, "resolve_device", lambda name, local_rank=None: torch.device("mps"))
    with pytest.raises(
        DlfsError, match=r"no bfloat16 autocast on mps .*; evaluate it on another device \(device=cpu\)"
    ):
        evaluate_module.evaluate_run(tmp_path / "run", device="mps")


def test_several_processes_on_a_mac_run_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Data-parallel ranks without CUDA talk over gloo, which has no MPS kernels: every rank on MPS failed in
    DistributedDataParallel's first broadcast. Under torchrun auto takes the CPU, and mps is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert distributed.resolve_device("auto") == torch.device("mps")  # one process: the Apple GPU
    assert distributed.resolve_device("auto", local_rank=1) == torch.device("cpu")
    with pytest.raises(DlfsError, match=r"^device=mps: data-parallel processes .* gloo, which carries no MPS"):
        distributed.resolve_device("mps", local_rank=0)
    assert distributed.resolve_device("mps") == torch.device("mps")


def test_a_rank_that_sees_one_gpu_takes_it_whatever_its_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """`srun --gpus-per-task=1`: SLURM shows each task only its own GPU, as GPU 0, and local ranks 1, 2, ...
    were refused ("no GPU of its own") while world() had already bound them to GPU 0 (local rank mod count).
    A process that sees several GPUs takes its local rank's, and one beyond them is still refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for local_rank in (0, 1, 3):
        assert distributed.resolve_device("cuda", local_rank=local_rank) == torch.device("cuda:0")
        assert distributed.resolve_device("auto", local_rank=local_rank) == torch.device("cuda:0")
    bound: list[int] = []  # world() binds the process's current GPU to the same one
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: None)
    monkeypatch.setattr(distributed.atexit, "register", lambda f: None)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.world() == World(3, 4, 3) and bound == [0]

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.resolve_device("cuda", local_rank=2) == torch.device("cuda:2")
    with pytest.raises(DlfsError, match=r"^local rank 5 has no GPU of its own: this process sees 4; start at most"):
        distributed.resolve_device("cuda", local_rank=5)


def test_two_ranks_on_one_gpu_are_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that sees one GPU takes it: two on a one-GPU machine would share it, which NCCL refuses with a
    traceback per rank at the first exchange. The ranks compare their machine and GPU first (over gloo), and
    every rank refuses, the ranks on other GPUs too (they would wait in the first exchange)."""
    gpu = torch.device("cuda:0")

    def on(uuid: str | None) -> int:  # what a rank on that GPU of this machine sends (-1: no UUID to compare)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid=uuid))
        ident = distributed.gpu_identity(gpu)
        return -1 if ident is None else ident[1]

    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 3)
    ranks: list[int] = []  # what ranks 1 and 2 send; this process is rank 0
    monkeypatch.setattr(
        distributed.dist,
        "all_gather",
        lambda every, mine: [t.fill_(v) for t, v in zip(every, [int(mine), *ranks], strict=True)],
    )
    ranks[:] = [on("GPU-bb"), on("GPU-bb")]  # ranks 1 and 2 share one: this rank refuses too
    on("GPU-aa")
    with pytest.raises(
        DlfsError, match=r"^ranks 1, 2 were given the same GPU: each rank needs a GPU of its own; start"
    ):
        distributed.check_distinct_gpus(gpu)
    ranks[:] = [on("GPU-bb"), on("GPU-aa")]  # this rank and rank 2: the line names this rank's GPU
    on("GPU-aa")
    with pytest.raises(DlfsError, match=r"^ranks 0, 2 were given the same GPU \(.*/GPU-aa\): each rank needs"):
        distributed.check_distinct_gpus(gpu)
    ranks[:] = [on("GPU-bb"), on("GPU-cc")]
    on("GPU-aa")
    distributed.check_distinct_gpus(gpu)  # three GPUs: nothing to say
    ranks[:] = [on(None), on(None)]
    on(None)
    distributed.check_distinct_gpus(gpu)  # a torch without GPU UUIDs: nothing to compare, nothing refused


def test_bf16_on_mps_before_macos_14_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch >= 2.6 has the autocast, but Apple's MPS has bfloat16 only from macOS 14 (torch finds out at the
    first operation)."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: major <= 13)
    with pytest.raises(DlfsError, match="no bfloat16 before macOS 14"):
        distributed.check_bf16(torch.device("mps"))
    distributed.check_bf16(torch.device("cpu"))  # the CPU's is there


# 4. the book's LSTM batches: the index on the characters' device ----------------------------------------


def test_book_batches_index_the_characters_on_their_own_device() -> None:
    """The characters live on the GPU: an index built on the host is copied to the GPU, and waited for,
    on every batch of book_lstm_charmodel."""
    batches = BookBatches(torch.arange(100, device=META), batch_size=4, sequence_length=5)
    with DeviceLog() as log:
        x, y = next(iter(batches))
    assert not log.mixed, f"host and device tensors in one operation: {log.mixed}"
    assert x.device == y.device == META and x.shape == y.shape == (4, 5)


# 7. the cuBLAS workspace: set before torch is imported ------------------------------------------------


def test_the_cublas_workspace_is_set_before_torch_is_imported() -> None:
    """trainer.deterministic=true on CUDA needs CUBLAS_WORKSPACE_CONFIG before the process first uses cuBLAS;
    train() set it, too late for the second run of an in-process sweep or reproduction."""
    code = "import os, sys, dlfs_cli; assert 'torch' not in sys.modules; print(os.environ['CUBLAS_WORKSPACE_CONFIG'])"
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == ":4096:8", out.stderr
    env["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"  # the user's own is kept
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == ":16:8", out.stderr


# 9. per-step accounting on an accelerator -------------------------------------------------------------


VIEWS = {"select", "slice", "alias", "view", "as_strided", "detach"}


def test_accounting_a_step_is_one_kernel() -> None:
    running = RunningLoss(META)
    loss = torch.ones((), device=META)
    running.add(loss, 4, 1)  # anything done once
    with DeviceLog() as log:
        for step in range(2, 12):
            running.add(loss, 4, step)
    kernels = [op for op in log.ops if op not in VIEWS]
    assert len(kernels) == 10, kernels  # about 8 a step before


def test_the_running_loss_keeps_the_sums_and_the_first_bad_step() -> None:
    """Losses folded into the sums when the buffer fills and at a read, and the first non-finite loss
    named by its step, whichever fold saw it: the one divergence mechanism of every device."""
    running = RunningLoss(torch.device("cpu"))
    steps = PENDING_STEPS + 20
    for step in range(1, steps + 1):
        running.add(torch.tensor(0.5), 2, step)
    assert running.diverged_at(SINGLE) is None  # nothing bad yet
    assert running.epoch.item() == steps * 1.0 and running.epoch_n == 2 * steps
    for step, loss in [(steps + 1, 1.0), (steps + 2, math.nan), (steps + 3, math.inf)]:
        running.add(torch.tensor(loss), 2, step)
    assert running.diverged_at(SINGLE) == steps + 2


def test_a_training_step_is_the_bare_loops_step_and_one_kernel(make_cfg, tmp_path: Path) -> None:
    """What the Trainer adds to each step beyond `zero_grad; loss(model(x), y).backward(); step`, counted
    as dispatched operations (each a kernel launch on a GPU, where a step is launch-bound): the loss's one
    `mul` into the pending buffer, and two views. Per step = (2n steps - n steps) / n, so that what an
    epoch does once (its row of metrics.csv, the divergence check) cancels out, as do the first steps'
    optimizer set-up."""
    cpu, n = torch.device("cpu"), 4
    batches = [(torch.randn(5, 4), torch.randn(5, 1)) for _ in range(2 + 2 * n)]

    def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def bare(steps: int) -> Counter[str]:
        model, optimizer = model_and_optimizer()
        loss_fn = trainer_module.make_loss("mse")
        with DeviceLog(cpu) as log:
            for x, y in batches[: 2 + steps]:
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                optimizer.step()
        return Counter(log.ops)

    def runner(steps: int) -> Counter[str]:
        model, optimizer = model_and_optimizer()
        run = RunFolder(tmp_path / f"run{steps}", live=False)
        run.start(make_cfg(), {}, ["loss", "mse", "rmse", "mae"])
        schedule = TrainerConfig(log_every=1000, checkpoint_every=0)  # no row or save inside the epoch
        trainer = Trainer(model, optimizer, None, schedule, "mse", cpu, run, {})
        with DeviceLog(cpu) as log:
            trainer._train_epoch(batches[: 2 + steps], None, ProgressDisplay(1, 2 + steps, live=False), 1)
        run.close()
        return Counter(log.ops)

    per_step = (runner(2 * n) - runner(n)) - (bare(2 * n) - bare(n))
    assert not (bare(2 * n) - bare(n)) - (runner(2 * n) - runner(n))  # the same work, nothing skipped
    assert {op: count / n for op, count in per_step.items()} == {"mul": 1, "select": 1, "detach": 1}


# 11. a failed distributed run leaves no process group behind -------------------------------------------


def test_a_failed_distributed_run_destroys_its_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """finish() tears the group down after a run that completed; a run that fails must too, at exit."""
    group: dict[str, bool] = {"up": False}
    destroyed, at_exit = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: group["up"])
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: group.update(up=True))

    def destroy() -> None:
        destroyed.append(1)
        group["up"] = False

    monkeypatch.setattr(distributed.dist, "destroy_process_group", destroy)
    monkeypatch.setattr("atexit.register", at_exit.append)
    assert distributed.world() == World(0, 2, 0)
    # the run fails: finish() is never called; then the interpreter exits
    for hook in at_exit:
        hook()
    assert destroyed == [1] and not group["up"]


# 5. bf16 and cuDNN's LSTM: the LSTM in float32 outside CUDA autocast ------------------------------------


class ReportsCuda(Tensor):
    """A CPU tensor that says it lives on CUDA: enough for code that chooses by `is_cuda`."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def test_under_cuda_autocast_the_lstm_runs_in_float32_and_its_dense_layer_in_bf16() -> None:
    """CUDA autocast runs cuDNN's LSTM in float16 whatever dtype it was asked for (bf16), and dlfs has no
    gradient scaler for float16: the LSTM leaves autocast on CUDA; the dense layer after it stays under it.
    CUDA autocast is switched on by hand here (it acts on CUDA tensors only, so the CPU numbers are real)."""
    layer = LSTMLayer(4, 3, 2)
    seen: dict[str, tuple[bool, bool, torch.dtype]] = {}  # module: (CUDA autocast on, CPU autocast on, input dtype)
    for name in ("lstm", "fc"):
        getattr(layer, name).register_forward_pre_hook(
            lambda m, args, name=name: seen.update(
                {name: (torch.is_autocast_enabled("cuda"), torch.is_autocast_enabled("cpu"), args[0].dtype)}
            )
        )
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    try:
        out, (h, c) = layer(torch.zeros(2, 5, 4).as_subclass(ReportsCuda))
    finally:
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])
    assert seen == {"lstm": (False, False, torch.float32), "fc": (True, False, torch.float32)}
    assert out.shape == (2, 5, 2) and h.dtype == c.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CPU keeps autocast's choice where it has a bf16 LSTM
        layer(torch.zeros(2, 5, 4))
    bf16 = cpu_has_bf16_lstm()  # where the CPU has none, the LSTM runs in float32 (the next test)
    lstm_out = torch.bfloat16 if bf16 else torch.float32
    assert seen == {"lstm": (False, bf16, torch.float32), "fc": (False, True, lstm_out)}


def test_a_cpu_without_a_bf16_lstm_runs_the_lstm_in_float32_and_the_rest_in_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """oneDNN's bfloat16 LSTM needs AVX-512: on an AVX2-only CPU it raised at the first step of every
    trainer.precision=bf16 run of the LSTM. There the LSTM leaves autocast; the dense layer after it stays."""
    monkeypatch.setattr(layers, "cpu_has_bf16_lstm", lambda: False)
    layer = LSTMLayer(4, 3, 2)
    seen: dict[str, tuple[bool, torch.dtype]] = {}
    for name in ("lstm", "fc"):
        getattr(layer, name).register_forward_hook(
            lambda m, args, out, name=name: seen.update({name: (torch.is_autocast_enabled("cpu"), args[0].dtype)})
        )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = layer(torch.zeros(2, 5, 4))
    assert seen == {"lstm": (False, torch.float32), "fc": (True, torch.float32)}
    assert out.dtype == torch.bfloat16 and h.dtype == c.dtype == torch.float32  # the LSTM's own output: float32


def test_asking_the_cpu_for_a_bf16_lstm_in_an_evaluation_gets_the_same_answer() -> None:
    """dlfs eval and generate ask first under inference_mode, where the probe's backward pass would fail
    and a bf16-capable CPU would be kept as one without."""
    plain = layers.probe_bf16_lstm()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layers.probe_bf16_lstm() == plain
    with torch.no_grad():
        assert layers.probe_bf16_lstm() == plain


PROBE = """
import torch
from dlfs_cli.layers import cpu_has_bf16_lstm
torch.manual_seed(0)
has = cpu_has_bf16_lstm()
after = torch.rand(3)
torch.manual_seed(0)
print(has, torch.equal(after, torch.rand(3)))
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ONEDNN_MAX_CPU_ISA caps x86 CPUs only")
def test_bf16_training_on_a_cpu_capped_at_avx2(tmp_path: Path) -> None:
    """Whole commands on a CPU without AVX-512 or bfloat16 instructions, whatever CPU runs the test: oneDNN's
    ONEDNN_MAX_CPU_ISA=AVX2 makes it use AVX2 alone (it reproduced the failure of issue 24). The LSTM trains
    in float32 where oneDNN has no bf16 LSTM for it, and train.log says so exactly then; the CNN's convolutions
    and matmuls, in bf16 and channels_last, train; and asking the CPU drew none of the run's random numbers."""
    capped = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    checked = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env={**os.environ, **capped}, timeout=120
    )
    has, kept = checked.stdout.split()  # (False with today's oneDNN: its bf16 LSTM needs AVX-512)
    assert kept == "True", checked.stderr[-2000:]
    quick = ["trainer.epochs=1", "trainer.limit_batches=3", "trainer.precision=bf16", "device=cpu"]
    quick += ["figures.enabled=false"]
    lstm = ["model=lstm_charmodel", "model.hidden_size=8", "data.sequence_length=5"]
    out = run_dlfs("train", *lstm, *quick, "hydra.run.dir=lstm", cwd=tmp_path, env=capped)
    assert out.returncode == 0, out.stderr[-2000:]
    said = "the LSTM runs in float32, the rest in bf16" in (tmp_path / "lstm" / "train.log").read_text()
    assert said == (has == "False")
    cnn = ["model=mnist_cnn", "data=digits", "trainer.channels_last=true"]
    out = run_dlfs("train", *cnn, *quick, "hydra.run.dir=cnn", cwd=tmp_path, env=capped)
    assert out.returncode == 0, out.stderr[-2000:]


# 6. a joblib sweep on CUDA: the jobs spread over the GPUs ----------------------------------------------


class Chosen(Exception):
    """Raised by the first call after train() has chosen its device: the test needs nothing more."""


def test_a_joblib_sweep_on_cuda_spreads_its_jobs_over_the_visible_gpus(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every job of `dlfs train -m hydra/launcher=joblib device=cuda` took GPU 0; job n takes GPU n mod the GPUs."""
    hydra = SimpleNamespace(mode=RunMode.MULTIRUN, launcher=None, job=SimpleNamespace(num=0))
    monkeypatch.setattr(sweep, "HydraConfig", SimpleNamespace(initialized=lambda: True, get=lambda: hydra))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    current: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)

    def chosen(on: bool, device: torch.device) -> None:
        raise Chosen(device)

    monkeypatch.setattr(distributed, "set_deterministic", chosen)

    def device_of(job: int, launcher: str, device: str = "cuda") -> torch.device:
        hydra.job.num = job
        hydra.launcher = OmegaConf.create({"_target_": launcher, "n_jobs": 2})
        with pytest.raises(Chosen) as got:
            train_module.train(make_cfg(*SMOKE, f"device={device}"), tmp_path / "run")
        return got.value.args[0]

    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert [device_of(job, joblib) for job in range(4)] == [torch.device("cuda", i) for i in (0, 1, 0, 1)]
    assert current == [0, 1, 0, 1]  # also the current device, for calls that take it
    assert device_of(3, joblib, "auto") == torch.device("cuda", 1)
    assert device_of(3, joblib, "cuda:0") == torch.device("cuda", 0)  # a GPU named by the user is kept
    assert device_of(3, joblib, "cpu") == torch.device("cpu")
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert device_of(3, basic) == torch.device("cuda")  # one job at a time: the current GPU
    assert not list(tmp_path.iterdir())  # nothing written: the device is chosen before the run folder


# 8. TF32: an explicit policy, recorded ---------------------------------------------------------------


def test_trainer_tf32_sets_the_backend_flags_either_way_and_is_recorded(make_cfg, tmp_path: Path) -> None:
    """On Ampere and later GPUs "float32" convolutions use TF32 unless told otherwise (torch's default), matmuls
    not: trainer.tf32 sets both, either way (they are process-wide), and summary.json says which."""
    before = (
        torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    try:
        for on in (True, False):
            train_module.train(make_cfg(*SMOKE, f"trainer.tf32={on}"), tmp_path / str(on))
            assert json.loads((tmp_path / str(on) / "summary.json").read_text())["tf32"] is on
            assert torch.backends.cuda.matmul.allow_tf32 is on and torch.backends.cudnn.allow_tf32 is on
            assert torch.get_float32_matmul_precision() == ("high" if on else "highest")
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1:]


def test_dlfs_eval_measures_with_the_runs_kernel_policy(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dlfs eval repeats the run's trainer.deterministic (on a GPU it chooses the kernels, and so the last
    digits), as it repeats tf32 and precision; a run without it sets nothing (torch's own default, and asking
    would import torch's compiler stack into dlfs eval). cudnn_benchmark, set for a CUDA target only, is not
    tested here."""
    from dlfs_cli import evaluate as evaluate_module

    for deterministic in (True, False):
        train_module.train(
            make_cfg(*SMOKE, f"trainer.deterministic={deterministic}", "figures.enabled=false"),
            tmp_path / str(deterministic),
        )
    torch.use_deterministic_algorithms(False)
    calls: list[tuple[bool, bool]] = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, warn_only: calls.append((on, warn_only)))
    evaluate_module.evaluate_run(tmp_path / "False")
    assert calls == []
    evaluate_module.evaluate_run(tmp_path / "True")
    assert calls == [(True, True)]


# 10. Boston on an accelerator: held there once, batched there --------------------------------------------


BOSTON = OmegaConf.create(
    {"name": "boston", "path": None, "test_size": 0.2, "split_seed": 80718, "scaling": "train", "num_workers": 0}
    | {"val_fraction": 0.0}
)


def test_boston_on_a_device_lives_there_and_is_batched_there() -> None:
    """Boston's DataLoader copied every batch from pageable host memory to the GPU: on a device the split is
    held there once, and a batch is indexed there."""
    data = build_data(BOSTON, 32, 0, device=META)
    with DeviceLog() as log:
        x, y = next(iter(data.train))
        tx, ty = next(iter(data.test))
    assert not log.mixed, f"host and device tensors in one operation: {log.mixed}"
    assert x.device == y.device == tx.device == ty.device == META
    assert x.shape == (32, 13) and y.shape == (32, 1) and tx.shape == (102, 13)
    assert len(data.train) == 13 and len(data.test) == 1 and data.train.generator is not None
    assert isinstance(build_data(BOSTON, 32, 0).train, DataLoader)  # the CPU path is as it was


@pytest.mark.parametrize("batch_size", [32, 101, 404, 500])  # a short last batch, full ones, one batch
def test_boston_device_batches_are_the_cpu_loaders_and_leave_its_generator_state(batch_size: int) -> None:
    """The same rows in the same batches as the CPU's DataLoader, epoch after epoch, and the generator in
    the same state after a whole epoch or part of one: a run, or a resume, on a GPU sees the CPU's order."""
    loader = build_data(BOSTON, batch_size, 3).train
    rows = boston.DeviceRows(*loader.dataset.tensors, batch_size, torch.Generator().manual_seed(3))
    for _ in range(3):
        pairs = list(zip(loader, rows, strict=True))
        assert all(torch.equal(a, b) for batch in pairs for a, b in zip(*batch, strict=True))
        assert torch.equal(loader.generator.get_state(), rows.generator.get_state())
    for taken in (0, 1, len(loader) - 1, len(loader)):  # a run stopped by limit_batches or a signal
        for batches in (iter(loader), iter(rows)):
            for _ in range(taken):
                next(batches)
        assert torch.equal(loader.generator.get_state(), rows.generator.get_state()), taken
    test = build_data(BOSTON, batch_size, 3).test
    held = boston.DeviceRows(*test.dataset.tensors, max(batch_size, 1024))
    assert all(torch.equal(a, b) for batch in zip(test, held, strict=True) for a, b in zip(*batch, strict=True))


def test_sequence_cross_entropy_never_takes_the_atomic_3d_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen on an H200: the (batch, vocab, length) form's CUDA forward adds with atomics, so an LSTM's loss
    moved in the 7th digit between two deterministic runs. The loss hands the kernel 2-d rows instead."""
    from torch.nn import functional

    from dlfs_cli.trainer import make_loss

    logits, target = torch.randn(4, 7, 5), torch.randint(7, (4, 5))
    expected = functional.cross_entropy(logits, target)
    dims: list[int] = []
    original = functional.cross_entropy

    def recording(input, target, *args, **kwargs):
        dims.append(input.dim())
        return original(input, target, *args, **kwargs)

    monkeypatch.setattr(functional, "cross_entropy", recording)
    for reduction in ("mean", "sum"):
        loss = make_loss("cross_entropy", reduction)(logits, target)
        reference = expected if reduction == "mean" else expected * target.numel()
        assert torch.allclose(loss, reference, rtol=1e-6)
    assert dims == [2, 2]
