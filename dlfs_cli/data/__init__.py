"""Datasets: each `data` config option builds train, validation and test loaders plus a DataInfo.

The validation split is carved out of the training part (data.val_fraction; `validation_positions`):
every decision during training is taken on it, and the test split is only reported.

New datasets join DATASETS here; their modules are imported only when used.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from omegaconf import DictConfig

from dlfs_cli.errors import DlfsError


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data to size itself."""

    name: str
    source: str  # where the data was read from
    n_train: int  # the rows (images, characters) that train: the training part less the validation split
    n_test: int
    n_val: int = 0  # 0: no validation split (data.val_fraction=0)
    num_features: int | None = None  # tabular data: columns per row
    num_classes: int | None = None  # classification: number of labels
    image_shape: tuple[int, int, int] | None = None  # images: (channels, height, width)
    vocab: str | None = None  # text: the sorted characters; index i is character vocab[i]


class Batches(Protocol):
    """A split's loader: yields (inputs, targets) batches and has a len(), the batches in an epoch (a
    DataLoader, or one of the loaders of data held on the device: DeviceRows, TensorBatches, ...)."""

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


@dataclass
class DataBundle:
    train: Batches
    test: Batches  # in a fixed order
    info: DataInfo
    test_labels: torch.Tensor | None = None  # class labels of the test split in loader order (for figures)
    val: Batches | None = None  # in a fixed order; None: data.val_fraction=0


def validation_positions(name: str, n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) positions among n training items of data `name`: a seeded draw of ceil(fraction * n)
    validates. Both keep the items' order, so that fraction 0 leaves the training data exactly as it was; a
    fraction that leaves nothing to train on is refused."""
    chosen = np.random.RandomState(seed).permutation(n)[: math.ceil(fraction * n)]
    if fraction and len(chosen) == n:
        raise too_few_to_validate(name, fraction, n)
    is_val = np.zeros(n, dtype=bool)
    is_val[chosen] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def too_few_to_validate(name: str, fraction: float, n: int) -> DlfsError:
    return DlfsError(f"data.val_fraction={fraction} leaves {name} with an empty split of its {n} training rows")


# data.name -> the module whose build(cfg, batch_size, seed, device, reconstruct) makes the loaders
DATASETS = {
    "boston": "dlfs_cli.data.boston",
    "mnist": "dlfs_cli.data.mnist",
    "digits": "dlfs_cli.data.digits",
    "text": "dlfs_cli.data.text",
}


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (an epoch's order) onto `device` without the host waiting for the copy: a copy
    from pageable memory blocks the host until the GPU has caught up, one from pinned memory does not."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def build_data(
    cfg: DictConfig, batch_size: int, seed: int, device: torch.device | None = None, reconstruct: bool = False
) -> DataBundle:
    """The loaders for data.name; the training loader reshuffles every epoch from `seed`.

    `reconstruct`: the model learns to reproduce its input (the autoencoder), so targets are inputs.
    """
    if cfg.name not in DATASETS:
        raise DlfsError(f"unknown data '{cfg.name}'; valid choices: {', '.join(DATASETS)}")
    device = device if device is not None else torch.device("cpu")
    return importlib.import_module(DATASETS[cfg.name]).build(cfg, batch_size, seed, device, reconstruct)
