"""MNIST through torchvision.datasets.MNIST: downloaded when missing (if allowed), read from
`<root>/MNIST/raw/` otherwise, and checked before training so that a bad file is named.

Two data paths, one result: `tensor` (the default) keeps each split as one uint8 tensor and scales
per batch; `torchvision` is the book's PIL -> ToTensor -> Normalize through a DataLoader.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset

from dlfs_cli.data import DataBundle, DataInfo, validation_positions
from dlfs_cli.data.images import MNIST_MEAN, MNIST_STD, PixelScale, TensorBatches, choose_scaling, place
from dlfs_cli.errors import DlfsError

if TYPE_CHECKING:
    from torchvision.datasets import MNIST

ENV_ROOT = "DLFS_DATA_ROOT"
SPLITS = {"train": 60_000, "t10k": 10_000}  # the real files' counts; small test files may hold fewer
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # IDX: 0x0803 = uint8, 3 dims; 0x0801 = uint8, 1 dim
HOW_TO_GET = (
    "get the four files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte (e.g. from https://ossci-datasets.s3.amazonaws.com/mnist/, gunzipped) into {raw}, "
    f"or point data.root (or ${ENV_ROOT}) at a folder that holds MNIST/raw/"
)


def raw_dir(root: Path) -> Path:
    return root / "MNIST" / "raw"  # torchvision's layout


def check_idx_files(raw: Path) -> dict[str, int]:
    """Validate the four raw IDX files (magic numbers, dimensions, sizes, counts); returns {split: count}.

    Raises DlfsError naming the first bad file and what is wrong with it.
    """
    counts = {}
    for split in SPLITS:
        images, labels = raw / f"{split}-images-idx3-ubyte", raw / f"{split}-labels-idx1-ubyte"
        n_images = _check_header(images, IMAGES_MAGIC, 16, per_item=28 * 28)
        n_labels = _check_header(labels, LABELS_MAGIC, 8, per_item=1)
        if n_images != n_labels:
            raise DlfsError(f"{images} holds {n_images} images but {labels} holds {n_labels} labels")
        if n_images == 0:
            raise DlfsError(f"{images} holds no images")
        if max(labels.read_bytes()[8:]) > 9:
            raise DlfsError(f"{labels} is corrupt: a label is not a digit 0-9")
        counts[split] = n_images
    return counts


def _check_header(path: Path, magic: int, header: int, per_item: int) -> int:
    if not path.is_file():
        raise DlfsError(f"{path} is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(header)
    if len(head) < header:
        raise DlfsError(f"{path} is truncated: {size} bytes, shorter than its {header}-byte header")
    found = int.from_bytes(head[:4], "big")
    if found != magic:
        hint = " (still gzipped? gunzip it)" if head[:2] == b"\x1f\x8b" else ""
        raise DlfsError(f"{path} is not an MNIST IDX file: magic number {found}, expected {magic}{hint}")
    n = int.from_bytes(head[4:8], "big")
    if header == 16:
        rows, cols = int.from_bytes(head[8:12], "big"), int.from_bytes(head[12:16], "big")
        if (rows, cols) != (28, 28):
            raise DlfsError(f"{path}: images are {rows}x{cols}, expected 28x28")
    expected = header + n * per_item
    if size != expected:
        what = "truncated" if size < expected else "too long"
        raise DlfsError(f"{path} is {what}: {size} bytes, expected {expected} for {n} items")
    return n


def ensure_mnist(root: Path, download: bool) -> dict[str, int]:
    """Make sure valid MNIST files are under root (downloading them if missing and allowed)."""
    raw = raw_dir(root)
    present = list(raw.glob("*-ubyte")) if raw.is_dir() else []
    if not present and download:
        from torchvision.datasets import MNIST

        try:
            MNIST(str(root), train=True, download=True)
        except Exception as ex:  # noqa: BLE001 - any network failure ends the same way
            reason = str(ex).strip().splitlines()[-1] if str(ex).strip() else type(ex).__name__
            raise DlfsError(
                f"MNIST is not in {raw} and the download failed ({reason}); " + HOW_TO_GET.format(raw=raw)
            ) from None
    elif not present:
        raise DlfsError(f"MNIST is not in {raw} (data.download=false); " + HOW_TO_GET.format(raw=raw))
    return check_idx_files(raw)


def build(cfg: DictConfig, batch_size: int, seed: int, device: torch.device, reconstruct: bool) -> DataBundle:
    from torchvision.datasets import MNIST  # ~1.4 s: only runs that use MNIST pay for it

    root = Path(os.path.expanduser(str(cfg.root)))
    counts = ensure_mnist(root, cfg.download)
    train_set, test_set = MNIST(str(root), train=True), MNIST(str(root), train=False)
    # the validation images: a draw from the training images, seeded by split_seed; the rest keep their order
    positions = validation_positions("mnist", len(train_set), cfg.val_fraction, cfg.split_seed)
    fit, val = (torch.as_tensor(i) for i in positions)
    whole = len(val) == 0  # no validation split: the training set as it is (no copy)
    train_px = train_set.data if whole else train_set.data[fit]
    scale = choose_scaling(cfg.scaling, reconstruct, train_px, (MNIST_MEAN, MNIST_STD))
    info = DataInfo(
        name="mnist",
        source=str(raw_dir(root)),
        n_train=len(fit),
        n_test=counts["t10k"],
        n_val=len(val),
        image_shape=(1, 28, 28),
        num_classes=10,
    )
    generator = torch.Generator().manual_seed(seed)
    eval_batch = max(batch_size, 1000)  # evaluation in big batches
    if cfg.pipeline == "tensor":
        train_y = train_set.targets if whole else train_set.targets[fit]
        train_px, train_y, val_px, val_y, test_px, test_y = place(
            (train_px, train_y, train_set.data[val], train_set.targets[val], test_set.data, test_set.targets), device
        )
        return DataBundle(
            TensorBatches(train_px, train_y, batch_size, scale, reconstruct, generator),
            TensorBatches(test_px, test_y, eval_batch, scale, reconstruct),
            info,
            test_set.targets,
            None if whole else TensorBatches(val_px, val_y, eval_batch, scale, reconstruct),
        )
    book = _BookDataset(train_set, scale, reconstruct)
    train_ds = book if whole else Subset(book, fit.tolist())
    # Workers are not persistent: each epoch's are seeded from `generator` again, so a resume replays them.
    workers, pin = cfg.num_workers, device.type == "cuda"
    return DataBundle(
        DataLoader(train_ds, batch_size, shuffle=True, generator=generator, num_workers=workers, pin_memory=pin),
        DataLoader(_BookDataset(test_set, scale, reconstruct), eval_batch, num_workers=workers, pin_memory=pin),
        info,
        test_set.targets,
        None if whole else DataLoader(Subset(book, val.tolist()), eval_batch, num_workers=workers, pin_memory=pin),
    )


class _BookDataset(Dataset):
    """The book's per-sample path: PIL image -> ToTensor -> Normalize (or the [-1, 1] scaling)."""

    def __init__(self, mnist: MNIST, scale: PixelScale, reconstruct: bool) -> None:
        from torchvision import transforms

        self.mnist = mnist
        self.reconstruct = reconstruct
        if scale.kind == "standard":
            self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((scale.a,), (scale.b,))])
        else:  # ToTensor divides by 255; undo it to apply the min/max scaling on raw pixel values
            self.transform = transforms.Compose([transforms.PILToTensor(), scale])

    def __len__(self) -> int:
        return len(self.mnist)

    def __getitem__(self, i: int):
        image, label = self.mnist[i]
        x = self.transform(image)
        return x, (x if self.reconstruct else label)
