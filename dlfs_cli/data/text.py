"""Characters of a text for the LSTM: a sorted vocabulary, the book's 80/20 split by position, and the
two batchings. Batches hold character indices; the model one-hot encodes them.

`streams` (default): the split is cut into `batch_size` contiguous streams; batch k holds the k-th
`sequence_length` characters of every stream, so row r of batch k+1 continues row r of batch k and
its final LSTM state is carried into it (truncated backpropagation through time).

`book`: the notebook's overlapping windows. Batch i starts at character 32 * i (the batch size);
row j starts one character after row j - 1. The batch-mean final state is carried to the next batch.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

from dlfs_cli.config import Batching, EvalState
from dlfs_cli.data import Batches, DataBundle, DataInfo, too_few_to_validate
from dlfs_cli.errors import DlfsError

CORPORA = Path(__file__).with_name("corpora")
CORPUS_FILES = {"book": "dlfs_book_input.txt.gz", "tinyshakespeare": "tinyshakespeare.txt.gz"}


def read_text(path: Path) -> str:
    """The text of a UTF-8 file (gzip-compressed if its name ends in .gz); errors name the file."""
    if not path.is_file():
        raise DlfsError(f"data.path: no such file: {path}")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as ex:  # truncated, not gzip at all, corrupt
            raise DlfsError(f"{path}: not a gzip file that opens ({ex})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as ex:
        raise DlfsError(f"{path} is not UTF-8 text (byte {ex.start}: {raw[ex.start : ex.start + 1]!r})") from None
    if not text:
        raise DlfsError(f"{path} is empty")
    return text


def vocabulary(text: str) -> str:
    """The sorted characters: the same indices in every process (set order depends on PYTHONHASHSEED)."""
    return "".join(sorted(set(text)))


def encode(text: str, vocab: str) -> Tensor:
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.int64)


class StreamBatches:
    """Truncated-BPTT batches: (batch, L) inputs and targets shifted by one, rows are contiguous streams."""

    carry = "rows"  # each row's final (h, c) starts the same row of the next batch

    def __init__(self, ids: Tensor, batch_size: int, sequence_length: int) -> None:
        rows = min(batch_size, (len(ids) - 1) // sequence_length) or 1  # a short split: fewer, whole streams
        per_row = len(ids) // rows
        self.streams = ids[: rows * per_row].view(rows, per_row)
        self.length = sequence_length

    def __len__(self) -> int:
        return (self.streams.shape[1] - 1 + self.length - 1) // self.length

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        last = self.streams.shape[1] - 1  # the final character of a stream is only ever a target
        for t in range(0, last, self.length):
            end = min(t + self.length, last)
            yield self.streams[:, t:end], self.streams[:, t + 1 : end + 1]


class BookBatches:
    """The notebook's batches: rows ids[i*B + j : i*B + j + L], targets one character later."""

    carry = "mean"  # the batch mean of the final states starts every row of the next batch

    def __init__(self, ids: Tensor, batch_size: int, sequence_length: int) -> None:
        self.ids, self.batch, self.length = ids, batch_size, sequence_length
        # the notebook's range(0, len - B - L - 1, B): every row of every batch fits with its target
        self.starts = range(0, len(ids) - batch_size - sequence_length - 1, batch_size)
        # (B, L + 1) positions from a batch start, on the characters' device: indexing a GPU tensor with a
        # CPU index would copy the index to the GPU and wait for it, on every batch
        offsets = torch.arange(sequence_length + 1, device=ids.device)
        self.rows = torch.arange(batch_size, device=ids.device).unsqueeze(1) + offsets

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in self.starts:
            window = self.ids[self.rows + start]
            yield window[:, :-1], window[:, 1:]


class WindowBatches:
    """Held-out text in non-overlapping windows of L (the notebook's evaluation), each from a zero state, or
    (from_training_state) each from the state carried out of training, the book's evaluation."""

    carry = None

    def __init__(self, ids: Tensor, batch_size: int, sequence_length: int, from_training_state: bool = False) -> None:
        count = (len(ids) - 1) // sequence_length
        self.windows = torch.stack([ids[k * sequence_length : (k + 1) * sequence_length + 1] for k in range(count)])
        self.batch = batch_size
        self.from_training_state = from_training_state  # evaluate() starts every window from that state

    def __len__(self) -> int:
        return (len(self.windows) + self.batch - 1) // self.batch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(self.windows), self.batch):
            window = self.windows[i : i + self.batch]
            yield window[:, :-1], window[:, 1:]


def build(cfg: DictConfig, batch_size: int, seed: int, device: torch.device, reconstruct: bool) -> DataBundle:
    if reconstruct:
        raise DlfsError("data=text has no images to reconstruct; use data=mnist or data=digits")
    path = Path(cfg.path).expanduser() if cfg.path else CORPORA / CORPUS_FILES[cfg.corpus.value]
    text = read_text(path)
    # the book's split, by position: [training | test]; the validation text is the end of the training part
    n_train = int(len(text) * cfg.train_fraction)
    n_val = int(n_train * cfg.val_fraction)
    L = cfg.sequence_length
    parts = (("training", n_train - n_val), ("validation", n_val), ("test", len(text) - n_train))
    for part, size in parts:
        if size < L + 1 and (size or part != "validation"):
            raise DlfsError(
                f"{path}: {len(text)} characters leave {size} for the {part} part, shorter than one window "
                f"of data.sequence_length + 1 = {L + 1}"
            )
    if cfg.val_fraction and not n_val:
        raise too_few_to_validate("text", cfg.val_fraction, n_train)
    vocab = vocabulary(text)
    ids = encode(text, vocab).to(device)
    train, val, test = ids[: n_train - n_val], ids[n_train - n_val : n_train], ids[n_train:]
    eval_rows = max(batch_size, 256)  # evaluation in big batches
    held_out: Callable[[Tensor], Batches]
    if cfg.batching == Batching.book:
        if len(train) < batch_size + L + 2:
            raise DlfsError(f"{path}: the training part is too short for one batch of {batch_size} book windows")
        train_batches: Batches = BookBatches(train, batch_size, L)
        carried = cfg.eval_state == EvalState.carried
        held_out = partial(WindowBatches, batch_size=eval_rows, sequence_length=L, from_training_state=carried)
    else:
        train_batches = StreamBatches(train, batch_size, L)
        held_out = partial(StreamBatches, batch_size=eval_rows, sequence_length=L)
    info = DataInfo(name="text", source=str(path), n_train=len(train), n_test=len(test), n_val=n_val, vocab=vocab)
    return DataBundle(train_batches, held_out(test), info, val=held_out(val) if n_val else None)
