"""The book's models, and the closed registry that builds them from a config.

Each model is a plain nn.Module whose `forward` returns outputs; losses and metrics belong to the
trainer (which also carries a recurrent model's state between batches).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from dlfs_cli.config import DlfsError
from dlfs_cli.data import DataInfo
from dlfs_cli.layers import ConvLayer, DenseLayer, LSTMLayer, LSTMState


class HousePricesModel(nn.Module):
    """The book's Boston model: Dense(13 -> hidden, activation, dropout) -> Dense(hidden -> 1)."""

    def __init__(
        self, in_features: int = 13, hidden_size: int = 13, activation: str = "sigmoid", dropout_keep: float = 1.0
    ) -> None:
        super().__init__()
        self.dense1 = DenseLayer(in_features, hidden_size, activation=activation, dropout_keep=dropout_keep)
        self.dense2 = DenseLayer(hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense2(self.dense1(x))


class MNIST_ConvNet(nn.Module):  # noqa: N801 - the book's name
    """The book's CNN: Conv -> Conv (flatten) -> Dense -> Dense(num_classes); 'same' padding, no pooling."""

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        channels: tuple[int, int] = (16, 8),
        filter_size: int = 5,
        hidden_size: int = 32,
        activation: str = "tanh",
        dropout_keep: float = 0.8,
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
        image_shape: tuple[int, int, int] = (1, 28, 28),
        hidden_dim: int = 28,
        channels: tuple[int, int] = (14, 7),
        filter_size: int = 5,
        activation: str = "tanh",
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
        image_shape: tuple[int, int, int] = (1, 28, 28),
        hidden_dim: int = 28,
        channels: tuple[int, int] = (14, 7),
        filter_size: int = 5,
        activation: str = "tanh",
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
        image_shape: tuple[int, int, int] = (1, 28, 28),
        hidden_dim: int = 28,
        channels: tuple[int, int] = (14, 7),
        filter_size: int = 5,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        self.encoder = Encoder(image_shape, hidden_dim, channels, filter_size, activation)
        self.decoder = Decoder(image_shape, hidden_dim, channels, filter_size, activation)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        code = self.encoder(x)
        return self.decoder(code), code


class NextCharacterModel(nn.Module):
    """The book's character model: one-hot characters -> LSTMLayer -> logits for the next character.

    forward takes character indices (batch, length) and the carried (h, c) state (None = zeros), and
    returns logits arranged (batch, vocab, length) for CrossEntropyLoss, with the new state.
    """

    def __init__(self, vocab_size: int, hidden_size: int = 256) -> None:
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


def _mnist_cnn(cfg: DictConfig, info: DataInfo) -> nn.Module:
    _needs(info, "image_shape", "mnist_cnn")
    _needs(info, "num_classes", "mnist_cnn")
    return MNIST_ConvNet(
        info.image_shape,
        info.num_classes,
        tuple(cfg.channels),
        cfg.filter_size,
        cfg.hidden_size,
        cfg.activation,
        cfg.dropout_keep,
    )


def _autoencoder(cfg: DictConfig, info: DataInfo) -> nn.Module:
    _needs(info, "image_shape", "autoencoder")
    return Autoencoder(info.image_shape, cfg.hidden_dim, tuple(cfg.channels), cfg.filter_size, cfg.activation)


def _lstm_charmodel(cfg: DictConfig, info: DataInfo) -> nn.Module:
    _needs(info, "vocab", "lstm_charmodel")
    return NextCharacterModel(len(info.vocab), cfg.hidden_size or len(info.vocab))


def _boston(cfg: DictConfig, info: DataInfo) -> nn.Module:
    _needs(info, "num_features", "boston")
    return HousePricesModel(info.num_features, cfg.hidden_size, cfg.activation, cfg.dropout_keep)


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
