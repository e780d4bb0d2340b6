"""`dlfs generate run=<folder>`: sample text from a trained lstm_charmodel, one character at a time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from dlfs_cli.checkpoint import load_run_checkpoint, model_of
from dlfs_cli.config import typed_config
from dlfs_cli.errors import DlfsError
from dlfs_cli.tracking import CHECKPOINT_DIR

GREEDY_BELOW = 1e-3  # a temperature this small means: always the likeliest character
# One model call per character, 1,000-3,000 a second on a CPU (hidden_size 256): 10**7 characters, some ten
# novels, take one to a few hours, all held in memory until printed. A longer length is a typo that would hang
# for days with no output, so it is refused before sampling (config.py's SIZE_MAX, 2**31 - 1, bounds counts of
# rows, not model calls).
LENGTH_MAX = 10**7


def check_length(length: int) -> None:
    if not 0 <= length <= LENGTH_MAX:
        raise DlfsError(f"invalid value for length: {length} (must be between 0 and {LENGTH_MAX})")


@torch.inference_mode()
def sample(
    model: torch.nn.Module,
    vocab: str,
    prime: str | None,
    length: int,
    temperature: float,
    seed: int,
    device: torch.device,
) -> str:
    """`prime` followed by `length` sampled characters; the same seed gives the same text."""
    check_length(length)
    if prime is None or prime == "":
        prime = "\n" if "\n" in vocab else vocab[0]
    unknown = sorted(set(prime) - set(vocab))
    if unknown:
        raise DlfsError(f"prime has characters outside the run's vocabulary: {''.join(unknown)!r}")
    model.eval()
    with one_thread(device):
        return _sample(model, vocab, prime, length, temperature, seed, device)


@contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """One CPU thread while sampling: a call per character is far too small to share among threads, whose
    hand-offs then cost more than the work (17 ms a character with two threads on a busy machine, 0.4 ms with
    one). The process's own count is put back (a run samples at its end; an in-process sweep goes on)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sample(
    model: torch.nn.Module, vocab: str, prime: str, length: int, temperature: float, seed: int, device: torch.device
) -> str:
    index = {c: i for i, c in enumerate(vocab)}
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
    chars = torch.tensor([[index[c] for c in prime]], device=device)
    logits, state = model(chars)  # the whole prime in one call; logits (1, vocab, len(prime))
    out = []
    for _ in range(length):
        last = logits[0, :, -1].float().cpu()
        if temperature < GREEDY_BELOW:
            nxt = int(last.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(last / temperature, dim=0), 1, generator=generator))
        out.append(vocab[nxt])
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    return prime + "".join(out)


def load_char_model(run_dir: Path, checkpoint: str, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The trained NextCharacterModel of a run folder and its vocabulary."""
    state = load_run_checkpoint(run_dir, checkpoint)
    name = (state.config.get("model") or {}).get("name")
    if name != "lstm_charmodel" or not state.vocab:
        raise DlfsError(f"run={run_dir} trained model={name}; dlfs generate needs an lstm_charmodel run")
    model = model_of(typed_config(state.config), state, run_dir / CHECKPOINT_DIR / f"{checkpoint}.pt", device)
    return model, state.vocab
