"""The book's building blocks as plain nn.Modules: DenseLayer, ConvLayer, LSTMLayer.

`dropout` in the book is a KEEP probability; here the argument is called `dropout_keep` so the
meaning cannot be misread, and it becomes nn.Dropout(p = 1 - dropout_keep). Train/eval mode is
PyTorch's own model.train() / model.eval() (the book's `inference=True` flag left layers in eval
mode for good).
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from dlfs_cli.config import Activation, DlfsError
from dlfs_cli.dropout import Dropout

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "none": nn.Identity,
}


def make_activation(name: str | Activation) -> nn.Module:
    """nn.Module for an activation name; an unknown name lists the valid ones."""
    key = name.value if isinstance(name, Activation) else name
    if key not in ACTIVATIONS:
        raise DlfsError(f"unknown activation '{key}'; valid choices: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[key]()


def _dropout(keep: float) -> nn.Module:
    """nn.Dropout(p = 1 - keep) with cheaper CPU masks (dlfs_cli/dropout.py); keep 1 = no layer."""
    if not 0 < keep <= 1:
        raise DlfsError(f"dropout_keep must be in (0, 1], got {keep}")
    return Dropout(keep) if keep < 1 else nn.Identity()


class DenseLayer(nn.Module):
    """Linear -> activation -> dropout."""

    def __init__(
        self, input_size: int, neurons: int, activation: str | Activation = "none", dropout_keep: float = 1.0
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(input_size, neurons)
        self.activation = make_activation(activation)
        self.dropout = _dropout(dropout_keep)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.activation(self.linear(x)))


class ConvLayer(nn.Module):
    """Conv2d with 'same' padding (filter_size // 2, as in the book) -> activation -> flatten -> dropout."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        filter_size: int,
        activation: str | Activation = "none",
        flatten: bool = False,
        dropout_keep: float = 1.0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, filter_size, padding=filter_size // 2)
        self.activation = make_activation(activation)
        self.flatten = flatten
        self.dropout = _dropout(dropout_keep)

    def forward(self, x: Tensor) -> Tensor:
        x = self.activation(self.conv(x))
        if self.flatten:
            x = x.flatten(start_dim=1)  # (B, C, H, W) -> (B, C*H*W)
        return self.dropout(x)


LSTMState = tuple[Tensor, Tensor]


@torch.compiler.disable  # under trainer.compile=true: asked as plain Python, never traced into the graph
@functools.cache
def cpu_has_bf16_lstm() -> bool:
    """probe_bf16_lstm's answer, asked once in a process."""
    return probe_bf16_lstm()


def probe_bf16_lstm() -> bool:
    """Whether this CPU trains an LSTM under bfloat16 autocast. oneDNN has a bfloat16 LSTM only where the CPU
    has AVX-512 (or more): on an AVX2-only CPU, and so on many laptops and servers, the LSTM raised "could not
    create a primitive descriptor" at the first step. Asked once, with a one-step LSTM trained as a run would
    train it, under a forked generator so that asking draws none of the run's random numbers, and with
    gradients on whoever asks first (an evaluation asks under no_grad, and the answer is kept)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, _ = nn.LSTM(1, 1)(torch.zeros(1, 1, 1))
            out.float().sum().backward()
    except RuntimeError:
        return False
    return True


def lstm_precision(x: Tensor) -> AbstractContextManager:
    """On CUDA the LSTM runs in float32 outside autocast: CUDA autocast runs cuDNN's LSTM in float16
    whatever autocast's dtype (bf16 asked), and dlfs has no gradient scaler for float16's small gradients.
    The CPU keeps autocast's own choice (bfloat16 under trainer.precision=bf16) where it has a bfloat16
    LSTM, and float32 where it has none (cpu_has_bf16_lstm): the layers around it stay under autocast."""
    if x.is_cuda:
        return torch.autocast("cuda", enabled=False)
    if _cpu_autocast() and lstm_leaves_cpu_bf16(x.device):
        return torch.autocast("cpu", enabled=False)
    return nullcontext()


def lstm_leaves_cpu_bf16(device: torch.device) -> bool:
    """Whether an LSTM on `device` runs in float32 under trainer.precision=bf16 for want of a bfloat16 LSTM
    on this CPU (train.log says so once)."""
    return device.type == "cpu" and not cpu_has_bf16_lstm()


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch 2.3 (the floor) takes no device here: its own function for the CPU
        return torch.is_autocast_cpu_enabled()


class LSTMLayer(nn.Module):
    """nn.LSTM(batch_first) over the whole sequence, then a DenseLayer at every time step.

    The carried (h, c) state is passed in and returned rather than kept on the layer: the caller (the
    trainer's CarriedState) owns it, so it follows the model's device, evaluation cannot overwrite the
    training state (two bugs of the book's code), and how it is carried is the data's choice: each row's
    own final state (data.batching=streams), or the batch mean of the final states for every row, as
    the book's notebook carries it (data.batching=book). None is the zero state.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.fc = DenseLayer(hidden_size, output_size)

    def forward(self, x: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        """(batch, length, input_size) -> (batch, length, output_size), final (h, c) of shape (1, batch, hidden)."""
        with lstm_precision(x):
            out, (h, c) = self.lstm(x.float(), state)  # float32 whatever the caller passes (a no-op for one-hots)
        return self.fc(out), (h, c)
