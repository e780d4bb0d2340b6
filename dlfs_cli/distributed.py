"""Data-parallel training under torchrun: who this process is, and the few collectives the loop needs.

`torchrun --nproc_per_node=N -m dlfs_cli train ...` starts N copies of dlfs, each told its RANK,
LOCAL_RANK and WORLD_SIZE by environment variables. They train one model together:

- **Batches.** `trainer.batch_size` is the *global* batch. Every rank draws the same epoch order (the
  same seeded generator) and keeps its own slice of each batch's rows, so the union of the ranks'
  shards is exactly the single-process epoch, and the same hyperparameters mean the same training
  at any world size. The loss is scaled so that DistributedDataParallel's gradient average equals
  the gradient of the global batch's mean loss, even when the rows do not split evenly.
- **One run folder.** Rank 0 picks the folder's timestamp and sends it to the others before Hydra
  starts (`agree_on_run_stamp`); only rank 0 writes config, metrics, summary, checkpoints, figures.
- **Agreement.** A stop (a signal) or a diverged loss seen by any rank stops every rank at the same
  step; held-out metrics are summed over the ranks' shards of the test split.

The process group carries CPU tensors over gloo and CUDA tensors over NCCL ("cpu:gloo,cuda:nccl"),
so the stop flag (agreed on about every half second: trainer.StopAgreement) never waits for the GPU.
With one process every collective is a no-op.

Also here, for every command that runs a model (train, eval, generate): the device, the seeds, and
the process-wide numeric switches (determinism, TF32).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import random
import socket
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor

from dlfs_cli.config import TrainerConfig
from dlfs_cli.errors import DlfsError
from dlfs_cli.system import STAMP_ENV


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, batch: Tensor, dim: int = 0) -> Tensor:
        """This rank's rows of a global batch (contiguous slices; the first ranks get one more row when
        the rows do not divide evenly, and a rank may get none in a tiny last batch)."""
        if not self.distributed:
            return batch
        return torch.tensor_split(batch, self.size, dim=dim)[self.rank]

    def sum(self, values: Tensor) -> Tensor:
        """Element-wise sum over the ranks."""
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def max_ints(self, values: list[int]) -> list[int]:
        """Element-wise maximum over the ranks, of a few host integers (a CPU tensor: gloo, so it never
        waits for a GPU)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def first_step(self, step: int) -> int | None:
        """The earliest of the ranks' steps (-1: this rank has none); None when no rank has one."""
        never = 1 << 62
        earliest = -self.max_ints([-(step if step >= 0 else never)])[0]
        return None if earliest == never else earliest

    def sum_numbers(self, values: list[Tensor | float], device: torch.device) -> list[float]:
        """Element-wise sums over the ranks of a few numbers, some on `device` (loss sums on an accelerator)
        and some on the host (counts): all go onto the device in one dtype first, since a collective takes
        one tensor and the process group carries device tensors over NCCL. One host sync."""
        dtype = sum_dtype(device)
        both = torch.stack([torch.as_tensor(v, dtype=dtype, device=device) for v in values])
        return self.sum(both).tolist()

    def mean(self, total: Tensor | float, n: int, device: torch.device) -> float:
        """A loss summed over this rank's n targets, as the mean over every rank's targets."""
        count: float = n
        if self.distributed:
            total, count = self.sum_numbers([total, n], device)
        return float(total / max(count, 1))


SINGLE = World()  # one process: no torchrun


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of running sums kept on `device`: float64 where the device has it; Apple's MPS has no
    float64 (a float64 tensor there is an error), so float32."""
    return torch.float32 if device.type == "mps" else torch.float64


def world() -> World:
    """This process's place, from torchrun's environment; the process group is set up on first use."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        gpu = local_gpu(local_rank, torch.cuda.device_count()) if torch.cuda.is_available() else None
        if gpu is not None:
            torch.cuda.set_device(gpu)
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        atexit.register(_leave)  # a run that fails never reaches finish()
    return World(rank, size, local_rank)


def _leave() -> None:
    """At exit, the process group that finish() did not tear down (the run failed). PyTorch asks for it:
    without it NCCL warns that pending operations may not have finished, and a rank that exits that way
    can, rarely, block the other ranks."""
    if dist.is_initialized():
        dist.destroy_process_group()


def agree_on_run_stamp() -> None:
    """Rank 0's timestamp for the run folder, given to every rank (before Hydra makes the folder)."""
    w = world()
    stamp = [datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f") if w.main else None]  # Hydra's ${now:} format
    dist.broadcast_object_list(stamp, src=0)
    assert stamp[0] is not None  # rank 0's, on every rank now
    os.environ[STAMP_ENV] = stamp[0]


def finish() -> None:
    """Leave together: a rank tearing its connections down while rank 0 still writes figures can
    bring the process down at exit (gloo)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def set_deterministic(on: bool, device: torch.device) -> None:
    """PyTorch's deterministic algorithms, and what CUDA needs for them (cuBLAS workspace, no cuDNN autotune)."""
    # CUBLAS_WORKSPACE_CONFIG, which CUDA needs for them, is set when dlfs_cli is imported (before torch)
    # warn_only: an operation with no deterministic kernel (some CUDA losses) warns instead of ending the run.
    # Only on a change: torch.use_deterministic_algorithms imports torch's compiler stack (torch._inductor) to
    # set its flag too, start-up that dlfs eval (no optimizer, so no torch._dynamo) would pay for nothing
    if torch.are_deterministic_algorithms_enabled() != on or (
        on and not torch.is_deterministic_algorithms_warn_only_enabled()
    ):
        torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    if on:
        torch.backends.cudnn.benchmark = False


def set_kernels(trainer: TrainerConfig | DictConfig, device: torch.device) -> None:
    """A run's kernel policy (`trainer.deterministic`, `tf32`, `cudnn_benchmark`), set either way: the flags
    are process-wide (an in-process sweep's next job), and dlfs eval measures a run as it was trained."""
    set_deterministic(trainer.deterministic, device)
    set_tf32(trainer.tf32)
    if device.type == "cuda":  # cuDNN's autotuning: a CUDA switch, left alone elsewhere
        torch.backends.cudnn.benchmark = trainer.cudnn_benchmark and not trainer.deterministic


def set_tf32(on: bool) -> None:
    """trainer.tf32: TensorFloat32 (10-bit mantissa) in CUDA's float32 matmuls and cuDNN convolutions, or true
    float32. Set either way: the flags are process-wide (an in-process sweep's next job), and torch's own
    defaults mix them (TF32 convolutions, float32 matmuls). The CPU has no TF32: nothing changes there."""
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def check_bf16(device: torch.device, fix: str = "use trainer.precision=fp32") -> None:
    """trainer.precision=bf16 needs bfloat16 autocast on the device. Where torch lacks it, autocast either
    refuses the device (Apple's MPS before torch 2.5) or warns and trains in float32 under a run labelled
    bf16 (MPS before torch 2.6; a CUDA GPU without bfloat16 refuses); and MPS has bfloat16 only from
    macOS 14, which torch finds out at the first operation. Either way: one line before anything runs,
    ending with `fix` (what the command at hand can change)."""
    fix += " (on Apple's MPS, bf16 needs torch >= 2.6 and macOS 14 or later)"
    mps = torch.backends.mps
    if device.type == "mps" and mps.is_available() and not mps.is_macos_or_newer(14, 0):
        raise DlfsError(f"trainer.precision=bf16: Apple's MPS has no bfloat16 before macOS 14; {fix}")
    reason = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # CUDA asks the current GPU: make it this one (a machine may mix GPU generations)
            with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    pass
        except RuntimeError as ex:
            reason = str(ex)
    # only autocast's own "Disabling autocast" warning: another (a deprecation) says nothing about bf16 here
    reason = reason or next((str(w.message) for w in caught if "Disabling autocast" in str(w.message)), None)
    if reason is not None:
        first = (reason.strip().splitlines() or ["refused"])[0]
        raise DlfsError(
            f"trainer.precision=bf16: no bfloat16 autocast on {device.type} with torch {torch.__version__} "
            f"({first}); {fix}"
        )


def check_compile() -> None:
    """trainer.compile=true on the CPU: torch.compile's inductor builds its kernels with a C++ compiler (g++,
    or $CXX; clang++ on a Mac), which it looks for only at the first step, ending the run there with a long
    traceback where there is none. Looked for here, as inductor does, before anything runs."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch without this function (its module moved): inductor will say it itself
        return
    try:
        get_cpp_compiler()
    except Exception as ex:  # torch._inductor.exc.InvalidCxxCompiler, or what another release raises
        first = (str(ex).strip().splitlines() or [type(ex).__name__])[0][:200]
        raise DlfsError(
            f"trainer.compile=true: torch.compile found no C++ compiler to build its kernels ({first}); "
            "install one (g++, or name it in $CXX) or leave trainer.compile=false"
        ) from None


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """auto picks CUDA, then MPS, then the CPU; asking for one that is not there is an error.
    Under torchrun, `cuda` (or auto) is the local rank's GPU; without CUDA the ranks talk over gloo,
    which carries no MPS tensors, so there auto is the CPU and `mps` is refused."""
    if local_rank is not None and name == "mps":
        raise DlfsError(
            "device=mps: data-parallel processes (torchrun, trainer.nproc) exchange their tensors over gloo, "
            "which carries no MPS tensors; use device=cpu (or device=auto) for several processes on a Mac"
        )
    if local_rank is not None and name.startswith("cuda") and name != "cuda":
        raise DlfsError(f"device={name}: under torchrun each rank takes its own GPU; use device=cuda or device=auto")
    if local_rank is not None and (name == "cuda" or (name == "auto" and torch.cuda.is_available())):
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpu = local_gpu(local_rank, visible)
        if visible and gpu is None:
            raise DlfsError(
                f"local rank {local_rank} has no GPU of its own: this process sees {visible}; "
                "start at most that many processes per machine (trainer.nproc, --nproc_per_node)"
            )
        name = f"cuda:{gpu if gpu is not None else local_rank}"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available() and local_rank is None:
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


def local_gpu(local_rank: int, visible: int) -> int | None:
    """The GPU (an index among the `visible` ones) of the process with this local rank, None if it has none.
    Its local rank, as torchrun numbers the processes it starts on a machine, or the one GPU it sees where it
    sees one: a scheduler that binds a GPU to each task (SLURM's `srun --gpus-per-task=1`) shows each
    process only its own, as GPU 0, whatever its local rank. Two ranks on one GPU are refused by
    check_distinct_gpus once the ranks can talk."""
    if local_rank < visible:
        return local_rank
    return 0 if visible == 1 else None


def gpu_identity(device: torch.device) -> tuple[str, int] | None:
    """This machine and GPU: a name, and a 56-bit number of it that a host tensor can carry. None where torch
    does not give the GPU's UUID: its index alone would make every `srun --gpus-per-task=1` rank GPU 0."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is None:
        return None
    name = f"{socket.gethostname()}/{uuid}"
    return name, int.from_bytes(hashlib.sha1(name.encode()).digest()[:7], "big")


def check_distinct_gpus(device: torch.device) -> None:
    """Under torchrun on CUDA: every rank on a GPU of its own. A process that sees one GPU takes it
    (local_gpu), and if two such processes see the same one, NCCL would fail at the first exchange with a
    traceback per rank. Each rank's machine and GPU, gathered over gloo (host tensors); every rank sees
    the whole list and refuses alike (a rank left running would wait in the first exchange until killed)."""
    ident = gpu_identity(device)
    mine = torch.tensor([ident[1] if ident is not None else -1], dtype=torch.int64)  # every rank gathers
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    numbers = [int(t) for t in every]
    shared = {n for n in numbers if n != -1 and numbers.count(n) > 1}
    if shared:
        ranks = [rank for rank, n in enumerate(numbers) if n in shared]
        where = f" ({ident[0]})" if ident is not None and ident[1] in shared else ""
        raise DlfsError(
            f"ranks {', '.join(map(str, ranks))} were given the same GPU{where}: each rank needs a GPU of its "
            "own; start at most one process per GPU (trainer.nproc, --nproc_per_node, srun --gpus-per-task=1)"
        )


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
