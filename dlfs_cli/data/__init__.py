"""Datasets: each `data` config option builds a train and a held-out DataLoader plus a DataInfo.

New datasets join DATASETS here; their modules are imported only when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from omegaconf import DictConfig

from dlfs_cli.errors import DlfsError


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data to size itself."""

    name: str
    source: str  # where the data was read from
    n_train: int
    n_test: int
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
