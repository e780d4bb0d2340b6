"""The book's models, and the closed registry that builds them from a config.

Each model is a plain nn.Module whose `forward` returns outputs; losses and metrics belong to the
trainer (which also carries a recurrent model's state between batches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dlfs_cli.config import DlfsError
from dlfs_cli.data import DataInfo
from dlfs_cli.layers import ConvLayer, DenseLayer, LSTMLayer, LSTMState


class HousePricesModel(nn.Module):
    """The book's Boston model: Dense(in_features -> hidden, activation, dropout) -> Dense(hidden -> 1)."""

    def __init__(self, *, in_features: int, hidden_size: int, activation: str, dropout_keep: float) -> None:
        super().__init__()
        self.dense1 = DenseLayer(in_features, hidden_size, activation=activation, dropout_keep=dropout_keep)
        self.dense2 = DenseLayer(hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense2(self.dense1(x))


class MNIST_ConvNet(nn.Module):  # noqa: N801 - the book's name
    """The book's CNN: Conv -> Conv (flatten) -> Dense -> Dense(num_classes); 'same' padding, no pooling."""

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        num_classes: int,
        channels: Sequence[int],
        filter_size: int,
        hidden_size: int,
        activation: str,
        dropout_keep: float,
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        self.conv1 = ConvLayer(c, channels[0], filter_size, activation, dropout_keep=dropout_keep)
        self.conv2 = ConvLayer(
            channels[0], channels[1], filter_size, activation, flatten=True, dropout_keep=dropout_keep
        )
        self.dense1 = DenseLayer(channels[1] * h * w, hidden_size, activation, dropout_keep=dropout_keep)
        self.dense2 = DenseLayer(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, num_classes) raw logits (the loss applies the softmax)."""
        return self.dense2(self.dense1(self.conv2(self.conv1(x))))


class Encoder(nn.Module):
    """Conv -> Conv (flatten) -> Dense(hidden_dim): an image to its code in (-1, 1)."""

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        hidden_dim: int,
        channels: Sequence[int],
        filter_size: int,
        activation: str,
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        self.conv1 = ConvLayer(c, channels[0], filter_size, activation)
        self.conv2 = ConvLayer(channels[0], channels[1], filter_size, activation, flatten=True)
        self.dense1 = DenseLayer(channels[1] * h * w, hidden_dim, activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense1(self.conv2(self.conv1(x)))


class Decoder(nn.Module):
    """Dense(hidden_dim -> C*H*W) -> reshape -> Conv -> Conv(1 channel): a code back to an image."""

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        hidden_dim: int,
        channels: Sequence[int],
        filter_size: int,
        activation: str,
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        self.shape = (channels[1], h, w)
        self.dense1 = DenseLayer(hidden_dim, channels[1] * h * w, activation)
        self.conv1 = ConvLayer(channels[1], channels[0], filter_size, activation)
        self.conv2 = ConvLayer(channels[0], c, filter_size, activation)

    def forward(self, code: Tensor) -> Tensor:
        x = self.dense1(code).view(-1, *self.shape)
        return self.conv2(self.conv1(x))


class Autoencoder(nn.Module):
    """The book's autoencoder; forward returns (reconstruction, code) and the trainer trains on the first."""

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        hidden_dim: int,
        channels: Sequence[int],
        filter_size: int,
        activation: str,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(
            image_shape=image_shape,
            hidden_dim=hidden_dim,
            channels=channels,
            filter_size=filter_size,
            activation=activation,
        )
        self.decoder = Decoder(
            image_shape=image_shape,
            hidden_dim=hidden_dim,
            channels=channels,
            filter_size=filter_size,
            activation=activation,
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        code = self.encoder(x)
        return self.decoder(code), code


class NextCharacterModel(nn.Module):
    """The book's character model: one-hot characters -> LSTMLayer -> logits for the next character.

    forward takes character indices (batch, length) and the carried (h, c) state (None = zeros), and
    returns logits arranged (batch, vocab, length) for CrossEntropyLoss, with the new state.
    """

    def __init__(self, *, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.lstm = LSTMLayer(vocab_size, hidden_size, vocab_size)

    def forward(self, chars: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        x = F.one_hot(chars, self.vocab_size).float()  # (batch, length, vocab), as the book feeds it
        out, state = self.lstm(x, state)  # one cuDNN/oneDNN call over all steps: no Python time loop
        return out.permute(0, 2, 1), state


def _needs(info: DataInfo, what: str, model: str) -> None:
    if getattr(info, what) is None:
        kind = {
            "num_features": "tabular data (rows of features)",
            "image_shape": "images",
            "vocab": "text",
            "num_classes": "class labels",
        }[what]
        raise DlfsError(f"model={model} needs {kind}; data={info.name} has none")


def _fields(cfg: DictConfig) -> dict[str, Any]:
    """The model's settings from its config, as keyword arguments (its `name` picked the class)."""
    fields = cast(dict[str, Any], OmegaConf.to_container(cfg, enum_to_str=True))
    return {k: v for k, v in fields.items() if k != "name"}


def _mnist_cnn(cfg: DictConfig, info: DataInfo) -> nn.Module:
    _needs(info, "image_shape", "mnist_cnn")
    _needs(info, "num_classes", "mnist_cnn")
    assert info.image_shape is not None and info.num_classes is not None  # _needs refused None
    return MNIST_ConvNet(**_fields(cfg), image_shape=info.image_shape, num_classes=info.num_classes)


def _autoencoder(cfg: DictConfig, info: DataInfo) -> nn.Module:
    _needs(info, "image_shape", "autoencoder")
    assert info.image_shape is not None  # _needs refused None
    return Autoencoder(**_fields(cfg), image_shape=info.image_shape)


def _lstm_charmodel(cfg: DictConfig, info: DataInfo) -> nn.Module:
    _needs(info, "vocab", "lstm_charmodel")
    assert info.vocab is not None  # _needs refused None
    vocab_size = len(info.vocab)
    fields = _fields(cfg)
    hidden_size = fields.pop("hidden_size") or vocab_size  # None: the vocabulary size (the book's notebook)
    return NextCharacterModel(**fields, vocab_size=vocab_size, hidden_size=hidden_size)


def _boston(cfg: DictConfig, info: DataInfo) -> nn.Module:
    _needs(info, "num_features", "boston")
    assert info.num_features is not None  # _needs refused None
    return HousePricesModel(**_fields(cfg), in_features=info.num_features)


MODELS: dict[str, Callable[[DictConfig, DataInfo], nn.Module]] = {
    "boston": _boston,
    "mnist_cnn": _mnist_cnn,
    "autoencoder": _autoencoder,
    "lstm_charmodel": _lstm_charmodel,
}
RECONSTRUCTS = {"autoencoder"}  # models trained to reproduce their input: the data's targets are the inputs


def build_model(cfg: DictConfig, info: DataInfo) -> nn.Module:
    """The model named by cfg.name, sized for the data described by `info`."""
    if cfg.name not in MODELS:
        raise DlfsError(f"unknown model '{cfg.name}'; valid choices: {', '.join(MODELS)}")
    return MODELS[cfg.name](cfg, info)
