"""The CPU dropout masks (dlfs_cli/dropout.py): nn.Dropout's distribution, exact keep probability,
independent masks, the right gradient, reproducible and resumable draws; other devices keep nn.Dropout."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from dlfs_cli import dropout as dropout_module
from dlfs_cli.checkpoint import capture_rng, restore_rng
from dlfs_cli.dropout import Dropout, keep_mask, keep_threshold
from dlfs_cli.layers import ConvLayer, DenseLayer


@pytest.fixture(autouse=True)
def one_thread():
    """The tests' own torch operations on one thread: when other work holds the cores, each parallel one
    waits for a second thread (the masks do not depend on the thread count: test below)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kept(module: nn.Module, draws: int, n: int) -> torch.Tensor:
    """(draws, n) booleans: which units `draws` successive forward passes kept."""
    ones = torch.ones(n)
    return torch.stack([module(ones) != 0 for _ in range(draws)])


def reference_mask(n: int, keep: float) -> torch.Tensor:
    """keep_mask's kept units, flat, from the generator's next draws the slow, obvious way: u < T, u 32-bit."""
    threshold = keep_threshold(keep)
    first = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-(2**63), None).view(torch.uint8)[:n].long()
    tied = (first == threshold >> 24).nonzero().squeeze(1)  # in order: the low 24 bits are drawn in this order
    u = first << 24
    u[tied] += torch.empty(tied.numel(), dtype=torch.int64).random_(0, 2**24)
    u[first != threshold >> 24] += 2**23  # any low bits: the top byte decides
    return u < threshold


@pytest.mark.parametrize("keep", [0.8, 0.5, 0.1, 0.3, 1e-3, 0.999999, 1 - 2**-30, 1 - 2**-34, 2**-31])
def test_keep_probability_is_exact(keep: float) -> None:
    threshold = keep_threshold(keep)  # of the 2**32 values of a uniform 32-bit u, exactly this many keep
    assert 0 <= threshold < 2**32
    assert abs(threshold / 2**32 - keep) <= 2**-32  # 1e-6 asked; 16-bit thresholds miss 0.8 by 3e-6
    assert abs(round(0.8 * 2**16) / 2**16 - 0.8) > 1e-6


@pytest.mark.parametrize(
    ("n", "keep"), [(1, 0.8), (105, 0.8), (1000, 0.3), (33_769, 0.8), (32_771, 0.3), (50_000, 1 - 2**-34), (0, 0.5)]
)
def test_a_mask_is_the_generators_next_draws_below_the_threshold(n: int, keep: float) -> None:
    """The scheme itself: u < T with u from the default CPU generator, a byte a unit (the other 24 bits
    only where the top byte ties with T's)."""
    x = torch.randn(n)
    torch.manual_seed(3)
    mask = keep_mask(x, keep)
    after = torch.rand(1)  # the generator's state after the mask: the same draws were taken
    torch.manual_seed(3)
    expected = reference_mask(n, keep)
    assert torch.equal(mask != 0, expected) and torch.equal(torch.rand(1), after)
    assert (mask[expected] == torch.ones(1) / keep).all()  # scaled as nn.Dropout scales
    if n >= 30_000:
        assert (expected.float().mean() - keep).abs() < 0.02  # ties resolved, not all dropped or kept


@pytest.mark.parametrize(
    ("keep", "n", "draws"),
    [(0.8, 1000, 4000), (0.3, 1000, 4000), (0.8, 40_000, 300), (0.3, 40_000, 300), (204.5 / 256, 40_000, 300)],
)
def test_kept_fraction_has_the_binomial_mean_and_variance(keep: float, n: int, draws: int) -> None:
    torch.manual_seed(0)
    masks = kept(DenseLayer(1, 1, dropout_keep=keep).dropout, draws, n).double()
    fraction = masks.mean(dim=1)  # of each pass
    assert abs(fraction.mean().item() - keep) < 4 * (keep * (1 - keep) / masks.numel()) ** 0.5
    # a pass's kept fraction varies as keep (1 - keep) / n; the estimate's relative error is sqrt(2 / draws)
    assert fraction.var().item() == pytest.approx(keep * (1 - keep) / n, rel=4 * (2 / draws) ** 0.5)
    blocks = masks.reshape(-1, 1000).mean(dim=1)  # within a pass too: blocks of 1000 units
    assert blocks.var().item() == pytest.approx(keep * (1 - keep) / 1000, rel=4 * (2 / len(blocks)) ** 0.5)


@pytest.mark.parametrize(("n", "draws"), [(1000, 1000), (40_000, 50)])
def test_masks_are_independent_between_draws_and_between_units(n: int, draws: int) -> None:
    torch.manual_seed(1)
    m = kept(Dropout(0.8), draws, n).double()
    limit = 4 / m.numel() ** 0.5  # 4 standard errors of a correlation of ~1e6 pairs

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()

    assert abs(corr(m[1:], m[:-1])) < limit  # a pass's mask against the next pass's
    assert abs(corr(m[:, 1:], m[:, :-1])) < limit  # neighbours (parts of one 64-bit draw)
    assert abs(corr(m[:, 8:], m[:, :-8])) < limit  # the same byte of successive draws
    assert abs(corr(m[:, n // 2 :], m[:, : n // 2])) < limit
    both = (m[:, 0::2] * m[:, 1::2]).mean().item()  # both neighbours kept: keep**2
    assert both == pytest.approx(0.64, abs=4 * (0.64 * 0.36 / m[:, 0::2].numel()) ** 0.5)


@pytest.mark.parametrize("shape", [(4, 6, 5, 5), (4, 16, 28, 28)])
def test_backward_multiplies_the_gradient_by_the_same_mask(shape: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    x = (torch.rand(shape) + 0.5).requires_grad_()  # no zero inputs: out == 0 only where dropped
    out = Dropout(0.8)(x)
    mask = (out != 0).float() / 0.8
    assert torch.equal(out, x * mask)
    g = torch.randn_like(out)
    (out * g).sum().backward()  # d/dout = g
    assert torch.equal(x.grad, g * mask)


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 16, 32, 32)])
def test_same_seed_same_masks_other_seed_other_masks(shape: tuple[int, ...]) -> None:
    layer = ConvLayer(1, 4, 3, dropout_keep=0.8).dropout
    x = torch.ones(shape)
    torch.manual_seed(5)
    a = layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), a)
    torch.manual_seed(6)  # another seed, as another rank's (seed + rank)
    assert not torch.equal(layer(x), a)


def test_masks_do_not_depend_on_the_thread_count() -> None:
    x = torch.ones(8, 16, 28, 28)
    masks = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch.manual_seed(4)
        masks.append(keep_mask(x, 0.8))
    assert torch.equal(*masks)


@pytest.mark.parametrize("shape", [(60, 16), (60, 16, 6, 6)])
def test_checkpointed_generator_state_reproduces_the_next_masks(shape: tuple[int, ...]) -> None:
    layer = Dropout(0.8)
    x = torch.ones(shape)
    torch.manual_seed(0)
    layer(x)
    saved = io.BytesIO()
    torch.save(capture_rng(), saved)  # as a checkpoint holds it
    expected = [layer(x), layer(x)]
    torch.manual_seed(123)  # anything in between
    layer(x)
    saved.seek(0)
    restore_rng(torch.load(saved, weights_only=True))
    assert all(torch.equal(layer(x), e) for e in expected)


def test_eval_mode_is_the_identity() -> None:
    layer = Dropout(0.5).eval()
    x = torch.randn(10, 10)
    assert layer(x) is x


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 16, 28, 28)])
def test_the_mask_keeps_the_input_dtype_and_layout(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    out = Dropout(0.8)(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert abs((out != 0).float().mean() - 0.8) < 5 * (0.16 / x.numel()) ** 0.5
    torch.manual_seed(1)
    half = keep_mask(x.bfloat16(), 0.8)  # made in float32 (numpy has no bfloat16), then cast
    torch.manual_seed(1)
    assert torch.equal(half, keep_mask(x, 0.8).bfloat16()) and half.is_contiguous(memory_format=torch.channels_last)
    assert Dropout(0.8)(x.double()).dtype == torch.float64
    strided = x.contiguous()[:, ::2]  # not dense: the mask takes the contiguous layout
    assert Dropout(0.8)(strided).shape == strided.shape
    assert Dropout(0.8)(torch.empty(0, 3)).shape == (0, 3)
    assert Dropout(0.8)(torch.tensor(2.0)).shape == ()


class OnDevice:
    """Stands for a tensor on an accelerator (none here): all that forward reads before dispatching is its device."""

    def __init__(self, kind: str) -> None:
        self.device = torch.device(kind)


def test_accelerators_and_compile_keep_pytorchs_dropout(monkeypatch) -> None:
    calls = []

    def spy(x, p, training, inplace):
        calls.append((x.device.type, p, training))
        return x

    def no_cpu_mask(*args):
        raise AssertionError("the CPU mask off the CPU")

    monkeypatch.setattr(nn.functional, "dropout", spy)  # what nn.Dropout.forward calls
    layer = Dropout(0.8)
    layer(torch.ones(3))  # the CPU: our mask
    assert calls == []
    monkeypatch.setattr(dropout_module, "keep_mask", no_cpu_mask)
    for kind in ("cuda", "mps"):
        x = OnDevice(kind)
        assert layer(x) is x
    assert calls == [("cuda", pytest.approx(0.2), True), ("mps", pytest.approx(0.2), True)]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # inside torch.compile: inductor's own
    layer(torch.ones(3))
    assert calls[-1] == ("cpu", pytest.approx(0.2), True)


def test_keep_must_be_a_probability_below_one() -> None:
    for keep in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError):
            Dropout(keep)
