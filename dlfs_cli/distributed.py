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
so the per-step stop flag never waits for the GPU.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import datetime

import torch
import torch.distributed as dist
from torch import Tensor

STAMP_ENV = "DLFS_RUN_STAMP"  # conf/train.yaml's hydra.run.dir uses it when set


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


SINGLE = World()  # one process: no torchrun


def world() -> World:
    """This process's place, from torchrun's environment; the process group is set up on first use."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
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
    os.environ[STAMP_ENV] = stamp[0]


def finish() -> None:
    """Leave together: a rank tearing its connections down while rank 0 still writes figures can
    bring the process down at exit (gloo)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
