"""The book's layers and the Boston model: shapes, dropout meaning, train/eval mode, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dlfs_cli.config import DlfsError
from dlfs_cli.data import DataInfo
from dlfs_cli.layers import ConvLayer, DenseLayer, LSTMLayer, make_activation
from dlfs_cli.models import MODELS, HousePricesModel, build_model


def test_dense_layer_shape_and_activation() -> None:
    layer = DenseLayer(13, 7, activation="sigmoid")
    out = layer(torch.randn(5, 13))
    assert out.shape == (5, 7)
    assert ((out > 0) & (out < 1)).all()


def test_dropout_keep_is_a_keep_probability() -> None:
    assert isinstance(DenseLayer(4, 4, dropout_keep=1.0).dropout, nn.Identity)
    dropout = DenseLayer(4, 4, dropout_keep=0.8).dropout
    assert isinstance(dropout, nn.Dropout) and dropout.p == pytest.approx(0.2)


def test_dropout_follows_train_and_eval_mode() -> None:
    torch.manual_seed(0)
    layer = DenseLayer(100, 100, dropout_keep=0.5)
    x = torch.randn(8, 100)
    layer.train()
    assert (layer(x) == 0).float().mean() > 0.3  # about half dropped
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    assert (layer(x) == 0).float().mean() < 0.05


def test_conv_layer_keeps_image_size_and_flattens() -> None:
    x = torch.randn(2, 1, 28, 28)
    assert ConvLayer(1, 16, 5, activation="tanh")(x).shape == (2, 16, 28, 28)
    assert ConvLayer(1, 8, 5, activation="tanh", flatten=True)(x).shape == (2, 8 * 28 * 28)


def test_lstm_layer_shapes_and_carried_state() -> None:
    layer = LSTMLayer(input_size=10, hidden_size=16, output_size=10)
    x = torch.randn(3, 25, 10)
    out, (h, c) = layer(x)
    assert out.shape == (3, 25, 10)
    assert h.shape == c.shape == (1, 3, 16)
    # carrying the final state into the next call changes the output: the state is really used
    out2, _ = layer(x, (h, c))
    assert not torch.allclose(out, out2)
    zeros = torch.zeros(1, 3, 16)
    assert torch.allclose(layer(x, (zeros, zeros))[0], out)  # no state = zero state


def test_house_prices_model() -> None:
    model = HousePricesModel(in_features=13, hidden_size=13, activation="tanh", dropout_keep=0.8)
    assert model(torch.randn(32, 13)).shape == (32, 1)
    assert sum(p.numel() for p in model.parameters()) == 13 * 13 + 13 + 13 + 1


def test_registry_builds_boston_and_names_the_valid_models() -> None:
    info = DataInfo(name="boston", source="x", n_train=1, n_test=1, num_features=13)
    cfg = {"name": "boston", "hidden_size": 5, "activation": "relu", "dropout_keep": 1.0}
    from omegaconf import OmegaConf

    model = build_model(OmegaConf.create(cfg), info)
    assert model(torch.randn(2, 13)).shape == (2, 1)
    with pytest.raises(DlfsError, match="valid choices: " + ", ".join(MODELS)):
        build_model(OmegaConf.create({**cfg, "name": "resnet"}), info)


def test_unknown_activation_lists_the_valid_ones() -> None:
    with pytest.raises(DlfsError, match="sigmoid, tanh, relu, none"):
        make_activation("swish")
