"""Datasets: each `data` config option builds a train and a held-out DataLoader plus a DataInfo.

New datasets (MNIST, digits, text) join DATASETS here; their modules are imported only when used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dlfs_cli.config import DlfsError

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from torch.utils.data import DataLoader


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data to size itself."""

    name: str
    source: str  # where the data was read from
    n_train: int
    n_test: int
    num_features: int | None = None  # tabular data: columns per row
    num_classes: int | None = None  # classification: number of labels


@dataclass
class DataBundle:
    train: DataLoader[Any]
    test: DataLoader[Any]
    info: DataInfo


DATASETS = {"boston": "dlfs_cli.data.boston"}  # data.name -> module with build(cfg, batch_size, seed)


def build_data(cfg: DictConfig, batch_size: int, seed: int) -> DataBundle:
    """The loaders for data.name; the training loader reshuffles every epoch from `seed`."""
    if cfg.name not in DATASETS:
        raise DlfsError(f"unknown data '{cfg.name}'; valid choices: {', '.join(DATASETS)}")
    return importlib.import_module(DATASETS[cfg.name]).build(cfg, batch_size, seed)
