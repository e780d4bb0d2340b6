"""Boston housing (506 rows, 13 features, target MEDV in $1000s) from the CSV bundled with dlfs.

Source: Harrison & Rubinfeld (1978) via StatLib; this copy is the one scikit-learn shipped before
1.2 removed `load_boston`. The split and the scaling reproduce scikit-learn's
`train_test_split` and `StandardScaler` exactly (tested against them) without importing
scikit-learn, which costs ~1.4 s per run here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from dlfs_cli.config import Scaling
from dlfs_cli.data import DataBundle, DataInfo, to_device_async, validation_positions
from dlfs_cli.errors import DlfsError

BUNDLED_CSV = Path(__file__).with_name("boston_house_prices.csv")
NUM_COLUMNS = 14  # 13 features, then MEDV


def load_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 13), target (N, 1)) as float64; a bad file raises DlfsError naming it."""
    if not path.is_file():
        raise DlfsError(f"data.path: no such file: {path}")
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    except ValueError as ex:
        raise DlfsError(f"{path}: not a numeric CSV with a header row ({ex})") from None
    if table.shape[1] != NUM_COLUMNS or len(table) < 2:
        raise DlfsError(
            f"{path}: expected a header and at least 2 rows of {NUM_COLUMNS} columns "
            f"(13 features, then MEDV), found {table.shape[0]} rows of {table.shape[1]}"
        )
    # numpy reads "nan" and "inf" as numbers, and 1e39 as a float64 that float32, the run's precision, holds as
    # inf: a run trained on them ended in "training diverged, try a lower optimizer.lr", the wrong place to look
    with np.errstate(over="ignore"):
        bad = np.argwhere(~np.isfinite(table.astype(np.float32)))
    if len(bad):
        row, column = (int(i) for i in bad[0])
        value = table[row, column]
        what = "not a finite number" if not np.isfinite(value) else "beyond float32's range (|x| < 3.4e38)"
        raise DlfsError(f"{path}: line {row + 2}, column {column + 1} is {value}, {what} ({len(bad)} such cells)")
    if _is_data(path):
        raise DlfsError(f"{path}: its first line is numbers, not a header (the first line is skipped as one)")
    return table[:, :-1], table[:, -1:]


def _is_data(path: Path) -> bool:
    """Whether the first line of a CSV is a row of numbers: a file without a header lost its first row."""
    with open(path, encoding="utf-8", errors="replace") as f:
        cells = f.readline().split(",")
    try:
        [float(c) for c in cells]
    except ValueError:
        return False
    return True


def split_indices(n: int, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's train_test_split(test_size, random_state=seed) indices: (train, test)."""
    n_test = math.ceil(test_size * n)
    permutation = np.random.RandomState(seed).permutation(n)
    return permutation[n_test:], permutation[:n_test]


def standard_scale(fit_rows: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    """StandardScaler: zero mean, unit (population) variance per column, fitted on `fit_rows`."""
    mean, std = fit_rows.mean(axis=0), fit_rows.std(axis=0)
    std[std == 0] = 1.0  # a constant column stays as it is, as in scikit-learn
    return [(a - mean) / std for a in arrays]


def build(cfg: DictConfig, batch_size: int, seed: int, device: torch.device, reconstruct: bool) -> DataBundle:
    if reconstruct:
        raise DlfsError("data=boston has no images to reconstruct; use data=mnist or data=digits")
    path = Path(cfg.path).expanduser() if cfg.path else BUNDLED_CSV
    X, y = load_csv(path)
    if cfg.scaling == Scaling.all:  # the book's notebook: statistics of all rows, test rows included
        (X,) = standard_scale(X, X)
    train_idx, test_idx = split_indices(len(X), cfg.test_size, cfg.split_seed)
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise DlfsError(f"data.test_size={cfg.test_size} leaves an empty split of {len(X)} rows")
    # the validation rows: a draw from the training rows, seeded by split_seed (the same for every run seed)
    fit, val = validation_positions("boston", len(train_idx), cfg.val_fraction, cfg.split_seed)
    train_idx, val_idx = train_idx[fit], train_idx[val]
    X_train, X_val, X_test = X[train_idx], X[val_idx], X[test_idx]
    if cfg.scaling == Scaling.train:  # fitted on the rows that train: neither test nor validation rows leak
        X_train, X_val, X_test = standard_scale(X_train, X_train, X_val, X_test)

    def tensors(features: np.ndarray, target: np.ndarray) -> TensorDataset:
        return TensorDataset(
            torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(target, dtype=torch.float32)
        )

    train_set, test_set = tensors(X_train, y[train_idx]), tensors(X_test, y[test_idx])
    val_set = tensors(X_val, y[val_idx])
    generator = torch.Generator().manual_seed(seed)  # a new order every epoch, the same for a seed
    eval_batch = max(batch_size, 1024)  # evaluation in big batches

    def in_order(split: TensorDataset) -> DataLoader | DeviceRows:
        if device.type == "cpu":
            return DataLoader(split, batch_size=eval_batch)
        features, target = (t.to(device) for t in split.tensors)
        return DeviceRows(features, target, eval_batch)

    train: DataLoader | DeviceRows
    if device.type == "cpu":
        train = DataLoader(train_set, batch_size, shuffle=True, generator=generator, num_workers=cfg.num_workers)
    else:  # a few kB: held on the device once, not copied from pageable memory batch by batch
        features, target = (t.to(device) for t in train_set.tensors)
        train = DeviceRows(features, target, batch_size, generator)
    info = DataInfo(
        name="boston",
        source=str(path),
        n_train=len(train_set),
        n_test=len(test_set),
        n_val=len(val_set),
        num_features=X.shape[1],
    )
    return DataBundle(train, in_order(test_set), info, val=in_order(val_set) if len(val_set) else None)


class DeviceRows:
    """(features, target) batches of a split held whole on the training device, in the order the CPU's
    DataLoader(shuffle=True, generator) gives: the same rows in the same batches, and the generator left
    in the same state (a resume on another device goes on with the same order). `generator`: None for a
    fixed order (evaluation)."""

    def __init__(self, features: Tensor, target: Tensor, batch_size: int, generator: torch.Generator | None = None):
        self.features, self.target = features, target
        self.batch_size = batch_size
        self.generator = generator  # the trainer saves its state in checkpoints

    def __len__(self) -> int:
        return math.ceil(len(self.features) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # The DataLoader's draws, when it makes them: its workers' base seed in iter(), the epoch's permutation
        # at the first batch, and RandomSampler's (empty) remainder permutation when the sampler runs out:
        # while filling a short last batch, or after a full one.
        if self.generator is None:
            return self._in_order()
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return self._shuffled(self.generator)

    def _in_order(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.features), self.batch_size):
            yield self.features[start : start + self.batch_size], self.target[start : start + self.batch_size]

    def _shuffled(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        n, size = len(self.features), self.batch_size
        order = to_device_async(torch.randperm(n, generator=generator), self.features.device)  # one small copy an epoch
        for start in range(0, n, size):
            if start + size > n:
                torch.randperm(n, generator=generator)
            idx = order[start : start + size]
            yield self.features[idx], self.target[idx]
        if n % size == 0:
            torch.randperm(n, generator=generator)
