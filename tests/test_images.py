"""The image models: MNIST files checked and read through torchvision (both data paths, on small
IDX files made here), the offline digits, the figures, and `dlfs eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dlfs_cli.config import AutoencoderConfig, DlfsError, MNISTConvNetConfig
from dlfs_cli.data import DataInfo, build_data
from dlfs_cli.data.mnist import check_idx_files
from dlfs_cli.evaluate import evaluate_run
from dlfs_cli.models import Autoencoder, MNIST_ConvNet, build_model
from dlfs_cli.train import train

RAW = ("MNIST", "raw")
PNG = b"\x89PNG\r\n\x1a\n"


def mnist_cfg(root: Path, **kw):
    return OmegaConf.create(
        {
            "name": "mnist",
            "root": str(root),
            "download": False,
            "pipeline": "tensor",
            "scaling": "auto",
            "num_workers": 0,
            "val_fraction": 0.1,
            "split_seed": 0,
            **kw,
        }
    )


def test_models_are_the_books() -> None:
    """The schema's defaults build the book's networks (28x28 images, 10 classes)."""
    info = DataInfo(name="mnist", source="x", n_train=1, n_test=1, num_classes=10, image_shape=(1, 28, 28))
    cnn = build_model(OmegaConf.structured(MNISTConvNetConfig), info)
    assert cnn(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert cnn.dense1.linear.in_features == 6272  # 8 channels x 28 x 28: no pooling
    assert cnn.conv1.dropout.p == pytest.approx(0.2)  # keep 0.8
    ae = build_model(OmegaConf.structured(AutoencoderConfig), info)
    assert isinstance(cnn, MNIST_ConvNet) and isinstance(ae, Autoencoder)
    recon, code = ae(torch.randn(3, 1, 28, 28))
    assert recon.shape == (3, 1, 28, 28) and code.shape == (3, 28)
    assert ae.encoder.dense1.linear.in_features == 5488 and recon.abs().max() <= 1  # tanh output


def test_valid_files_pass_the_check(mnist_root: Path) -> None:
    assert check_idx_files(mnist_root.joinpath(*RAW)) == {"train": 240, "t10k": 60}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "train-images-idx3-ubyte is truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:10]), "train-images-idx3-ubyte is truncated"),
        (lambda p: p.write_bytes(b"\x1f\x8b" + p.read_bytes()[2:]), "not an MNIST IDX file.*gunzip"),
        (lambda p: p.write_bytes(p.read_bytes() + b"\x00" * 784), "train-images-idx3-ubyte is too long"),
        (lambda p: p.unlink(), "train-images-idx3-ubyte is missing"),
    ],
)
def test_damaged_files_are_named(mnist_root: Path, damage, message: str) -> None:
    damage(mnist_root.joinpath(*RAW, "train-images-idx3-ubyte"))
    with pytest.raises(DlfsError, match=message):
        check_idx_files(mnist_root.joinpath(*RAW))


def test_label_problems_are_named(mnist_root: Path) -> None:
    labels = mnist_root.joinpath(*RAW, "t10k-labels-idx1-ubyte")
    data = bytearray(labels.read_bytes())
    data[20] = 42
    labels.write_bytes(bytes(data))
    with pytest.raises(DlfsError, match="t10k-labels-idx1-ubyte is corrupt"):
        check_idx_files(mnist_root.joinpath(*RAW))
    labels.write_bytes(bytes(data[:-5]))
    with pytest.raises(DlfsError, match="t10k-labels-idx1-ubyte is truncated"):
        check_idx_files(mnist_root.joinpath(*RAW))


def test_no_mnist_without_download_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DlfsError, match=r"MNIST is not in .*MNIST/raw.*data.download=false.*data.root"):
        build_data(mnist_cfg(tmp_path), 32, 0)


@pytest.mark.parametrize("reconstruct", [False, True])
def test_both_data_paths_give_the_same_inputs_and_targets(mnist_root: Path, reconstruct: bool) -> None:
    fast = build_data(mnist_cfg(mnist_root), 16, 0, reconstruct=reconstruct)
    book = build_data(mnist_cfg(mnist_root, pipeline="torchvision"), 16, 0, reconstruct=reconstruct)
    assert torch.equal(fast.test_labels, book.test_labels)
    for (x1, y1), (x2, y2) in zip(fast.test, book.test, strict=True):  # held-out: a fixed order
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    for (v1, w1), (v2, w2) in zip(fast.val, book.val, strict=True):  # the same validation images, in order
        assert torch.equal(v1, v2) and torch.equal(w1, w2)
    if reconstruct:  # the book's autoencoder scaling: [-1, 1] by the training set's min and max
        assert x1.min() >= -1 and x1.max() <= 1
    # training: each epoch a new order, every image once
    epochs = [torch.cat([y for _, y in fast.train]) for _ in range(2)]
    assert len(epochs[0]) == 216 and fast.info.n_val == 24  # a tenth of the 240 training images validates
    assert not torch.equal(epochs[0], epochs[1])
    if not reconstruct:
        assert torch.equal(epochs[0].sort().values, torch.cat([y for _, y in book.train]).sort().values)


def test_digits_need_no_download(make_cfg) -> None:
    data = build_data(make_cfg("data=digits").data, 60, 0)
    assert (data.info.n_train, data.info.n_val, data.info.n_test) == (1293, 144, 360)  # 1437 train, a tenth validates
    x, y = next(iter(data.train))
    assert x.shape == (60, 1, 28, 28) and y.dtype == torch.int64
    assert abs(float(torch.cat([b for b, _ in data.train]).mean())) < 0.05  # standardised on its own stats


def _figures(run: Path) -> set[str]:
    files = {p.name for p in (run / "figures").iterdir()}
    assert all((run / "figures" / f).read_bytes()[:8] == PNG for f in files)
    return files


@pytest.mark.parametrize("pipeline", ["tensor", "torchvision"])
def test_mnist_cnn_smoke_run_on_idx_files(make_cfg, mnist_root: Path, tmp_path: Path, pipeline: str) -> None:
    run = tmp_path / "run"
    cfg = make_cfg(
        "model=mnist_cnn",
        f"data.root={mnist_root}",
        "data.download=false",
        f"data.pipeline={pipeline}",
        "trainer.epochs=2",
        "trainer.batch_size=60",
        "device=cpu",
    )
    metrics = train(cfg, run)
    assert set(metrics) == {"val_loss", "val_accuracy", "test_loss", "test_accuracy"}
    assert 0 <= metrics["test_accuracy"] <= 1
    assert _figures(run) == {"loss_curves.png", "confusion_matrix.png"}


def test_autoencoder_smoke_run_leaves_the_books_pictures(make_cfg, mnist_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = make_cfg(
        "model=autoencoder",
        f"data.root={mnist_root}",
        "data.download=false",
        "trainer.epochs=1",
        "trainer.batch_size=30",
        "figures.tsne_points=50",
        "device=cpu",
    )
    metrics = train(cfg, run)
    assert metrics["test_mse"] < 1.0  # inputs and outputs both in [-1, 1]
    assert _figures(run) == {"loss_curves.png", "reconstructions.png", "tsne.png", "random_codes.png"}
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(summary["figures"]) == sorted(f"figures/{f}" for f in _figures(run))


@pytest.mark.parametrize("model", ["mnist_cnn", "autoencoder"])
def test_each_image_model_trains_on_digits(make_cfg, tmp_path: Path, model: str) -> None:
    cfg = make_cfg(
        f"model={model}",
        "data=digits",
        "trainer.epochs=1",
        "trainer.limit_batches=4",
        "figures.enabled=false",
        "device=cpu",
    )
    metrics = train(cfg, tmp_path / "run")
    assert metrics["test_loss"] > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_eval_recomputes_the_recorded_metrics_exactly(make_cfg, run_here, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = make_cfg(
        "model=mnist_cnn",
        "data=digits",
        "trainer.epochs=2",
        "trainer.limit_batches=5",
        "figures.enabled=false",
        "device=cpu",
    )
    metrics = train(cfg, run)
    last, best = evaluate_run(run, "last"), evaluate_run(run, "best")
    assert last["recomputed"] == last["recorded"] == metrics and best["recomputed"] == best["recorded"]

    # and through the CLI (in this process: test_train's test_checkpoint_reproduces_the_final_metrics_in_a_fresh_process
    # rebuilds a run from its checkpoint in a fresh one)
    out = run_here("eval", f"run={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "yes" in out.stdout and "NO" not in out.stdout


def test_eval_errors_are_one_line(run_here, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for args, message in (
        (["run=nowhere"], "run=nowhere: no such folder"),
        (["run=empty"], "no checkpoints/last.pt"),
        ([], "dlfs eval needs a run folder"),
        (["run=empty", "checkpoint=first"], "invalid value for checkpoint"),
    ):
        out = run_here("eval", *args, cwd=tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr


def test_truncated_mnist_file_ends_the_cli_run_naming_it(run_here, mnist_root: Path, tmp_path: Path) -> None:
    images = mnist_root.joinpath(*RAW, "train-images-idx3-ubyte")
    images.write_bytes(images.read_bytes()[:5000])
    out = run_here("train", "model=mnist_cnn", f"data.root={mnist_root}", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert f"{images} is truncated" in out.stderr
    assert not (tmp_path / "outputs").exists()
