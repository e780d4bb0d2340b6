"""nn.Dropout with cheaper masks on the CPU: the same distribution for about a quarter of bernoulli_'s time.

On the CPU, bernoulli_ (nn.Dropout's mask) takes about 10 ns a unit, a third or more of a book MNIST step.
Here a unit is kept when a uniform 32-bit number u is below T = round(keep * 2**32), which keeps it with
probability T / 2**32: keep to within 2**-33. The comparison is decided by u's top byte alone unless that
byte equals T's (1 unit in 256): so each unit takes one random byte, and only the tied units draw the
other 24 bits. The bytes come from torch's default CPU generator (random_ over the full int64 range, 8
bytes a draw), the one seed_everything seeds (seed + rank under torchrun) and checkpoints capture: the
masks are the same for a seed, differ by rank, and resume bit for bit. The comparisons run in numpy, on
one thread: torch would split each pass over its threads, and when other work holds the cores every such
pass waits for a second thread (a mask then took 48 ms instead of 1.5 ms). CUDA, MPS and torch.compile
keep nn.Dropout's own path.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)  # not bfloat16: its masks are made in float32


def keep_threshold(keep: float) -> int:
    """T: a uniform 32-bit unsigned number below T keeps its unit, with probability T / 2**32 = keep +- 2**-33."""
    return min(round(keep * 2**32), 2**32 - 1)  # keep * 2**32 is exact in a float


def random_bytes(n: int) -> np.ndarray:
    """n uniform random bytes from torch's default CPU generator (whole 8-byte draws: up to 7 more are spent)."""
    return torch.empty((n + 7) // 8, dtype=torch.int64).random_(-(2**63), None).numpy().view(np.uint8)[:n]


def keep_mask(like: Tensor, keep: float) -> Tensor:
    """1/keep where a unit is kept, 0 where dropped: `like`'s shape, dtype and layout (channels_last stays)."""
    mask = torch.empty_like(like)  # dense: its storage holds exactly its numel values
    made = mask if mask.dtype in NUMPY_FLOATS else torch.empty_like(mask, dtype=torch.float32)
    n, threshold = mask.numel(), keep_threshold(keep)
    top, rest = threshold >> 24, threshold & 0xFFFFFF
    first = random_bytes(n)  # u's top byte; byte i decides the unit at storage offset i
    flat = made.as_strided((n,), (1,)).numpy()  # the storage, in order
    np.less(first, top, out=flat)  # 1.0 / 0.0, decided unless tied
    tied = np.flatnonzero(first == top)
    low = torch.empty(tied.size, dtype=torch.int64).random_(0, 2**24).numpy()  # the tied units' other 24 bits
    flat[tied] = low < rest
    flat /= keep  # as nn.Dropout scales: kept units by 1 / keep
    return mask if made is mask else mask.copy_(made)


class Dropout(nn.Dropout):
    """nn.Dropout(p = 1 - keep); on the CPU its masks come from keep_mask."""

    def __init__(self, keep: float) -> None:
        if not 0 < keep < 1:
            raise ValueError(f"keep must be in (0, 1), got {keep}")
        super().__init__(1 - keep)
        self.keep = keep

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():  # their own fused random numbers
            return super().forward(x)
        return x * keep_mask(x, self.keep)  # backward: the gradient times the same mask

    def extra_repr(self) -> str:
        return f"keep={self.keep}"
