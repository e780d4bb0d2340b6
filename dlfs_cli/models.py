"""The book's models, and the closed registry that builds them from a config.

Each model is a plain nn.Module whose `forward` returns outputs; losses and metrics belong to the
trainer. Later models (MNIST_ConvNet, NextCharacterModel, Autoencoder) join MODELS here.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig
from torch import Tensor, nn

from dlfs_cli.config import DlfsError
from dlfs_cli.data import DataInfo
from dlfs_cli.layers import DenseLayer


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


def _boston(cfg: DictConfig, info: DataInfo) -> nn.Module:
    if info.num_features is None:
        raise DlfsError(f"model=boston needs tabular data (rows of features); data={info.name} is not")
    return HousePricesModel(info.num_features, cfg.hidden_size, cfg.activation, cfg.dropout_keep)


MODELS: dict[str, Callable[[DictConfig, DataInfo], nn.Module]] = {
    "boston": _boston,
}


def build_model(cfg: DictConfig, info: DataInfo) -> nn.Module:
    """The model named by cfg.name, sized for the data described by `info`."""
    if cfg.name not in MODELS:
        raise DlfsError(f"unknown model '{cfg.name}'; valid choices: {', '.join(MODELS)}")
    return MODELS[cfg.name](cfg, info)
