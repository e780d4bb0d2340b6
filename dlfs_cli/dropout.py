"""nn.Dropout with cheaper masks on the CPU: the same distribution for about a quarter of bernoulli_'s time.

On the CPU, bernoulli_ (nn.Dropout's mask) takes about 10 ns an element, a third or more of a book MNIST
step. Here a unit is kept when a uniform 32-bit number u is below T = round(keep * 2**32), which keeps it
with probability T / 2**32: keep to within 2**-33. The comparison is decided by u's top byte alone unless
that byte equals T's (1 unit in 256): so each unit takes one random byte, and only the tied units draw
the other 24 bits. The bytes come from torch's default CPU generator (random_ over the full int64 range,
8 bytes a draw), the one seed_everything seeds (seed + rank under torchrun) and checkpoints capture: the
masks are the same for a seed, differ by rank, and resume bit for bit. Small tensors take a whole 32-bit
word a unit (fewer operations). CUDA, MPS and torch.compile keep nn.Dropout's own path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BYTES_FROM = 1 << 15  # units; below this a mask takes a 32-bit word a unit: fewer, cheaper operations


def keep_threshold(keep: float) -> int:
    """T: a uniform 32-bit unsigned number below T keeps its unit, with probability T / 2**32 = keep +- 2**-33."""
    return min(round(keep * 2**32), 2**32 - 1)  # keep * 2**32 is exact in a float


def random_bytes(n: int) -> Tensor:
    """At least n uniform random bytes (uint8, flat) from torch's default CPU generator."""
    return torch.empty((n + 7) // 8, dtype=torch.int64).random_(-(2**63), None).view(torch.uint8)


def keep_mask(like: Tensor, keep: float) -> Tensor:
    """1/keep where a unit is kept, 0 where dropped: `like`'s shape, dtype and layout (channels_last stays)."""
    mask = torch.empty_like(like)  # dense: a flat buffer of numel values covers its strides exactly
    n, threshold = mask.numel(), keep_threshold(keep)
    # the value at i of a flat buffer decides the unit at storage offset i; comparisons write 1.0 / 0.0
    # straight into the mask (a bool tensor in between would be slower: its kernels are not vectorized)
    if n < BYTES_FROM:
        words = random_bytes(4 * n).view(torch.int32)[:n]  # as int32: u - 2**31
        torch.lt(words.as_strided(mask.shape, mask.stride()), threshold - 2**31, out=mask)
    else:
        top, rest = threshold >> 24, threshold & 0xFFFFFF
        first = random_bytes(n)  # u's top byte, a unit
        torch.lt(first[:n].as_strided(mask.shape, mask.stride()), top, out=mask)  # decided unless tied
        # the tied units: the 8-byte words that hold a tie (about 3% of them), then the ties in those
        tied = torch.eq(first, top, out=torch.empty_like(first)).view(torch.int64)
        word = tied.nonzero().squeeze(1)
        word_byte = tied[word].view(torch.uint8).view(-1, 8).nonzero()
        at = word[word_byte[:, 0]] * 8 + word_byte[:, 1]
        at = at[at < n]  # not the padding after the last unit
        low = torch.empty(at.numel(), dtype=torch.int64).random_(0, 2**24)  # u's other 24 bits
        mask.as_strided((n,), (1,))[at] = (low < rest).to(mask.dtype)
    return mask.div_(keep)  # as nn.Dropout scales: kept units by 1 / keep


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
