"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 16 grey levels) upsampled to
28x28, so that the MNIST models run with no download at all. Alon Kaynak's UCI optical digits,
as distributed inside scikit-learn (`sklearn.datasets.load_digits`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from dlfs_cli.data import DataBundle, DataInfo, validation_positions
from dlfs_cli.data.boston import split_indices
from dlfs_cli.data.images import TensorBatches, choose_scaling, place


def load_digits_28() -> tuple[torch.Tensor, torch.Tensor]:
    """(1797, 28, 28) uint8 pixels in 0-255, and (1797,) int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # 0-16 grey levels
    # Bilinear upsampling keeps strokes smooth; 28x28 is what the MNIST models are built for.
    big = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    pixels = (big.squeeze(1) * 255).round().to(torch.uint8)
    return pixels, torch.as_tensor(digits.target, dtype=torch.int64)


def build(cfg: DictConfig, batch_size: int, seed: int, device: torch.device, reconstruct: bool) -> DataBundle:
    pixels, labels = load_digits_28()
    train_idx, test_idx = split_indices(len(pixels), cfg.test_size, cfg.split_seed)
    # the validation images: a draw from the training images, seeded by split_seed
    fit, val = validation_positions("digits", len(train_idx), cfg.val_fraction, cfg.split_seed)
    train_rows, val_rows, test_rows = (torch.as_tensor(i) for i in (train_idx[fit], train_idx[val], test_idx))
    train_px, train_y = pixels[train_rows], labels[train_rows]
    scale = choose_scaling(cfg.scaling, reconstruct, train_px, None)  # digits' own statistics
    train_px, train_y, val_px, val_y, test_px, test_y = place(
        (train_px, train_y, pixels[val_rows], labels[val_rows], pixels[test_rows], labels[test_rows]), device
    )
    info = DataInfo(
        name="digits",
        source="sklearn.datasets.load_digits (8x8 upsampled to 28x28)",
        n_train=len(train_rows),
        n_test=len(test_rows),
        n_val=len(val_rows),
        image_shape=(1, 28, 28),
        num_classes=10,
    )
    eval_batch = max(batch_size, 1000)
    return DataBundle(
        TensorBatches(train_px, train_y, batch_size, scale, reconstruct, torch.Generator().manual_seed(seed)),
        TensorBatches(test_px, test_y, eval_batch, scale, reconstruct),
        info,
        labels[test_rows],
        TensorBatches(val_px, val_y, eval_batch, scale, reconstruct) if len(val_rows) else None,
    )
