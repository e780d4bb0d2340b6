"""PNG figures in <run>/figures/: loss curves for every run, a confusion matrix for classifiers, and
the book's autoencoder pictures (figure 7-3 reconstructions, 7-4 t-SNE of the codes, 7-5 random codes)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import cast

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dlfs_cli.tracking import METRICS_FILE, log, read_losses, spans_decades  # noqa: E402

FIGURES_DIR = "figures"


def make_figures(
    run_dir: Path,
    model: nn.Module,
    test_loader: Iterable,
    test_labels: torch.Tensor | None,
    loss_name: str,
    cfg,
    device: torch.device,
    between: Callable[[], None] = lambda: None,
) -> list[Path]:
    """Every figure that fits this run; returns the files written. `between`: called after each figure (a
    stop signal is honoured there, not after the last)."""
    out = run_dir / FIGURES_DIR
    out.mkdir(exist_ok=True)
    written = [loss_curves(run_dir / METRICS_FILE, out / "loss_curves.png", cfg.model.name)]
    between()
    model.eval()
    if loss_name == "cross_entropy" and test_labels is not None:  # labelled images, not characters
        y_true, y_pred = _predictions(model, test_loader, device)
        written.append(confusion_matrix(y_true, y_pred, out / "confusion_matrix.png"))
        between()
    if hasattr(model, "encoder") and hasattr(model, "decoder"):
        written += autoencoder_figures(model, test_loader, test_labels, cfg.figures, cfg.seed, device, out, between)
    for path in written:
        log.info("figure %s", path)
    return written


def loss_curves(metrics_csv: Path, path: Path, title: str) -> Path:
    losses = read_losses(metrics_csv)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for split, style in (("train", "-"), ("val", "o-"), ("test", "s-")):
        if losses[split]:
            ax.plot(*zip(*losses[split], strict=True), style, label=f"{split} loss")
    ax.set(xlabel="training step", ylabel="loss", title=f"{title}: loss")
    if spans_decades(loss for points in losses.values() for _, loss in points):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, path: Path) -> Path:
    k = int(max(y_true.max(), y_pred.max())) + 1
    counts = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(counts, cmap="Blues")
    for i in range(k):
        for j in range(k):
            color = "white" if counts[i, j] > counts.max() / 2 else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8, color=color)
    ax.set(
        xticks=range(k),
        yticks=range(k),
        xlabel="predicted digit",
        ylabel="true digit",
        title=f"confusion matrix (test accuracy {np.trace(counts) / counts.sum():.4f})",
    )
    fig.colorbar(im, ax=ax, label="test images")
    return _save(fig, path)


def autoencoder_figures(
    model: nn.Module,
    test_loader: Iterable,
    labels: torch.Tensor | None,
    cfg,
    seed: int,
    device: torch.device,
    out: Path,
    between: Callable[[], None] = lambda: None,
) -> list[Path]:
    originals, reconstructions, codes = [], [], []
    seen = 0
    with torch.inference_mode():
        for x, _ in test_loader:
            recon, code = model(x.to(device))
            if seen < cfg.reconstructions:
                originals.append(x[: cfg.reconstructions - seen].cpu())
                reconstructions.append(recon[: cfg.reconstructions - seen].cpu())
            codes.append(code.cpu())
            seen += len(x)
            if seen >= max(cfg.tsne_points, cfg.reconstructions):
                break
        generator = torch.Generator().manual_seed(seed)
        random_codes = torch.rand(cfg.random_codes, codes[0].shape[1], generator=generator) * 2 - 1
        decoder = cast(nn.Module, model.decoder)  # Module.__getattr__ is annotated Tensor | Module
        decoded = decoder(random_codes.to(device)).cpu()
    written = []
    if cfg.reconstructions:
        written.append(
            _image_rows(
                [torch.cat(originals), torch.cat(reconstructions)],
                ["original", "reconstruction"],
                "test images and their reconstructions (book figure 7-3)",
                out / "reconstructions.png",
            )
        )
        between()
    if cfg.tsne_points and labels is not None:
        all_codes = torch.cat(codes)[: cfg.tsne_points].numpy()
        written.append(tsne(all_codes, labels[: len(all_codes)].cpu().numpy(), seed, out / "tsne.png"))
        between()
    if cfg.random_codes:
        written.append(
            _image_rows(
                [decoded],
                ["decoded"],
                "the decoder on uniform(-1, 1) random codes (book figure 7-5)",
                out / "random_codes.png",
            )
        )
    return written


def tsne(codes: np.ndarray, labels: np.ndarray, seed: int, path: Path) -> Path:
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(1.0, (len(codes) - 1) / 3))  # t-SNE needs perplexity < points
    points = TSNE(
        n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed
    ).fit_transform(codes)
    fig, ax = plt.subplots(figsize=(8, 7))
    cmap = plt.get_cmap("tab10")
    for digit in range(10):
        mask = labels == digit
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=4, color=cmap(digit), label=str(digit))
    ax.set(title=f"t-SNE of {len(codes):,} test encodings, coloured by digit (book figure 7-4)", xticks=[], yticks=[])
    ax.legend(title="digit", markerscale=4, loc="center left", bbox_to_anchor=(1, 0.5))
    return _save(fig, path)


def _image_rows(rows: list[torch.Tensor], names: list[str], title: str, path: Path) -> Path:
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.4 * cols, 1.6 * len(rows) + 0.6), squeeze=False)
    for r, (images, name) in enumerate(zip(rows, names, strict=True)):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c, 0].numpy(), cmap="gray")
            if c == 0:
                ax.set_ylabel(name)
    fig.suptitle(title)
    return _save(fig, path)


def _predictions(model: nn.Module, loader: Iterable, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = [], []
    with torch.inference_mode():
        for x, y in loader:
            y_pred.append(model(x.to(device)).argmax(dim=1).cpu())
            y_true.append(y.cpu())
    return torch.cat(y_true).numpy(), torch.cat(y_pred).numpy()


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
