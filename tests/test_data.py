"""Boston data: the book's split and scaling (checked against scikit-learn), seeded shuffling, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from dlfs_cli.config import BostonDataConfig, DlfsError
from dlfs_cli.data import build_data, validation_positions
from dlfs_cli.data.boston import BUNDLED_CSV, load_csv, split_indices, standard_scale


def boston_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(BostonDataConfig), kw)  # the schema's defaults: the book's split


def test_bundled_csv_is_the_506_row_dataset() -> None:
    X, y = load_csv(BUNDLED_CSV)
    assert X.shape == (506, 13) and y.shape == (506, 1)
    assert y.min() == 5.0 and y.max() == 50.0  # MEDV in $1000s


@pytest.mark.parametrize(("test_size", "seed"), [(0.3, 80718), (0.25, 1), (0.5, 42)])
def test_split_is_scikit_learns_train_test_split(test_size: float, seed: int) -> None:
    X, y = load_csv(BUNDLED_CSV)
    train_idx, test_idx = split_indices(len(X), test_size, seed)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=test_size, random_state=seed)
    assert np.array_equal(X[train_idx], X_tr) and np.array_equal(X[test_idx], X_te)
    assert np.array_equal(y[train_idx], y_tr) and np.array_equal(y[test_idx], y_te)


def test_scaling_is_scikit_learns_standard_scaler() -> None:
    X, _ = load_csv(BUNDLED_CSV)
    a, b = X[:300], X[300:]
    ours = standard_scale(a, a, b)
    scaler = StandardScaler().fit(a)
    assert np.allclose(ours[0], scaler.transform(a)) and np.allclose(ours[1], scaler.transform(b))


def test_book_split_sizes_and_the_two_scalings() -> None:
    train_only = build_data(boston_cfg(val_fraction=0), batch_size=32, seed=0)
    all_rows = build_data(boston_cfg(scaling="all", val_fraction=0), batch_size=32, seed=0)
    assert (train_only.info.n_train, train_only.info.n_val, train_only.info.n_test) == (354, 0, 152)
    assert train_only.val is None
    X_train = train_only.train.dataset.tensors[0]
    assert torch.allclose(X_train.mean(0), torch.zeros(13), atol=1e-5)  # fitted on these rows
    X_train_all = all_rows.train.dataset.tensors[0]
    assert not torch.allclose(X_train_all.mean(0), torch.zeros(13), atol=1e-3)  # fitted on all 506


def test_training_batches_reshuffle_every_epoch_and_repeat_for_a_seed() -> None:
    def first_targets(seed: int) -> list[torch.Tensor]:
        loader = build_data(boston_cfg(), batch_size=32, seed=seed).train
        return [next(iter(loader))[1] for _ in range(2)]

    epoch1, epoch2 = first_targets(0)
    assert not torch.equal(epoch1, epoch2)
    assert all(torch.equal(a, b) for a, b in zip(first_targets(0), [epoch1, epoch2], strict=True))
    assert not torch.equal(first_targets(1)[0], epoch1)


def test_a_bad_csv_is_named(tmp_path: Path) -> None:
    with pytest.raises(DlfsError, match="no such file"):
        build_data(boston_cfg(path=str(tmp_path / "missing.csv")), 32, 0)
    short = tmp_path / "short.csv"
    short.write_text("a,b,c\n1,2,3\n4,5,6\n")
    with pytest.raises(DlfsError, match=r"short\.csv.*14 columns"):
        build_data(boston_cfg(path=str(short)), 32, 0)
    text = tmp_path / "text.csv"
    text.write_text("h\nnot,a,number\n")
    with pytest.raises(DlfsError, match=r"text\.csv"):
        build_data(boston_cfg(path=str(text)), 32, 0)


def test_the_validation_rows_come_from_the_training_rows_and_never_move() -> None:
    """71 of the 354 training rows validate (val_fraction 0.2), drawn with split_seed whatever the run's seed;
    the scaler is fitted on the 283 rows that train; val_fraction 0 leaves the book's 354 as they were."""
    X, y = load_csv(BUNDLED_CSV)
    train_idx, test_idx = split_indices(len(X), 0.3, 80718)
    data = build_data(boston_cfg(), batch_size=32, seed=0)
    assert (data.info.n_train, data.info.n_val, data.info.n_test) == (283, 71, 152)
    fit, val = validation_positions("boston", len(train_idx), 0.2, 80718)
    assert len(set(fit) | set(val)) == 354 and not set(fit) & set(val)
    val_targets = torch.cat([t for _, t in data.val])
    assert torch.equal(val_targets, torch.as_tensor(y[train_idx[val]], dtype=torch.float32))
    assert not set(train_idx[val]) & set(test_idx)
    X_fit = data.train.dataset.tensors[0]
    assert torch.allclose(X_fit.mean(0), torch.zeros(13), atol=1e-5)  # fitted on the rows that train
    other_seed = build_data(boston_cfg(), batch_size=32, seed=7)
    assert torch.equal(torch.cat([t for _, t in other_seed.val]), val_targets)  # the run's seed moves nothing
    whole = build_data(boston_cfg(val_fraction=0), batch_size=32, seed=0).train.dataset.tensors[1]
    assert torch.equal(whole, torch.as_tensor(y[train_idx], dtype=torch.float32))  # the book's rows, in order
    with pytest.raises(DlfsError, match="val_fraction"):
        build_data(boston_cfg(val_fraction=0.9999), batch_size=32, seed=0)
