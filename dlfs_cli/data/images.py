"""What the image datasets share: the book's two scalings, and the whole-split tensor batches.

`TensorBatches` keeps a split as one uint8 tensor (on the training device when it fits), draws each
epoch's order from a seeded permutation and scales batch by batch: no per-sample Python work, no
PIL, no worker processes. It gives the same numbers as the book's ToTensor + Normalize DataLoader.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from dlfs_cli.data import to_device_async
from dlfs_cli.errors import DlfsError

MNIST_MEAN, MNIST_STD = 0.1305, 0.3081  # the book's Normalize((0.1305,), (0.3081,))


@dataclass(frozen=True)
class PixelScale:
    """uint8 pixels -> float inputs: standardise (x/255 - mean) / std, or map [lo, hi] onto [-1, 1]."""

    kind: str  # "standard" | "minmax"
    a: float  # mean (standard) or lo (minmax), in the units noted above
    b: float  # std (standard) or hi (minmax)

    def __call__(self, pixels: Tensor) -> Tensor:
        x = pixels.float()
        if self.kind == "standard":  # as ToTensor() then Normalize(mean, std)
            return (x.div(255) - self.a) / self.b
        return (x - self.a) / (self.b - self.a) * 2 - 1  # the book's autoencoder: [-1, 1] by train min/max


def choose_scaling(
    kind: str, reconstruct: bool, train_pixels: Tensor, mean_std: tuple[float, float] | None
) -> PixelScale:
    """`auto` is minmax for a model that reconstructs its input (tanh output) and standard otherwise;
    standard uses `mean_std` (the book's MNIST constants) or else the training pixels' own statistics."""
    if kind == "auto":
        kind = "minmax" if reconstruct else "standard"
    if kind == "minmax":
        lo, hi = float(train_pixels.min()), float(train_pixels.max())
        if hi <= lo:
            raise DlfsError("data: every training pixel has the same value; cannot scale to [-1, 1]")
        return PixelScale("minmax", lo, hi)
    if kind == "standard":
        if mean_std is None:
            x = train_pixels.float().div(255)
            mean_std = (float(x.mean()), float(x.std()))
        return PixelScale("standard", *mean_std)
    raise DlfsError(f"data.scaling={kind!r}; valid choices: auto, standard, minmax")


class TensorBatches:
    """(inputs, targets) batches of a split held whole as tensors; targets are the inputs when `reconstruct`."""

    def __init__(
        self,
        pixels: Tensor,  # (N, H, W) uint8
        labels: Tensor,  # (N,) int64
        batch_size: int,
        scaling: PixelScale,
        reconstruct: bool,
        generator: torch.Generator | None = None,  # None: a fixed order (evaluation)
    ) -> None:
        self.pixels, self.labels = pixels, labels
        self.batch_size = batch_size
        self.scaling = scaling
        self.reconstruct = reconstruct
        self.generator = generator

    def __len__(self) -> int:
        return math.ceil(len(self.pixels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.pixels)
        if self.generator is not None:  # drawn on the CPU generator: the same order on every device
            order = to_device_async(torch.randperm(n, generator=self.generator), self.pixels.device)
        for start in range(0, n, self.batch_size):
            if self.generator is not None:
                idx = order[start : start + self.batch_size]
                pixels, labels = self.pixels[idx], self.labels[idx]
            else:
                pixels = self.pixels[start : start + self.batch_size]
                labels = self.labels[start : start + self.batch_size]
            x = self.scaling(pixels).unsqueeze(1)  # (B, 1, H, W)
            yield x, (x if self.reconstruct else labels)


def place(tensors: tuple[Tensor, ...], device: torch.device) -> tuple[Tensor, ...]:
    """Move the whole split to the training device when it fits comfortably; else keep it on the CPU."""
    if device.type == "cuda":
        needed = sum(t.numel() * t.element_size() for t in tensors)
        free, _ = torch.cuda.mem_get_info(device)
        if needed < free // 4:  # leave the rest to the model and its activations
            return tuple(t.to(device) for t in tensors)
    elif device.type == "mps":
        return tuple(t.to(device) for t in tensors)
    return tensors
