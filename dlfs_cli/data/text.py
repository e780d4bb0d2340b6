"""Characters of a text for the LSTM: a sorted vocabulary, the book's 80/20 split by position, and the
two batchings. Batches hold character indices; the model one-hot encodes them.

`streams` (default): the split is cut into `batch_size` contiguous streams; batch k holds the k-th
`sequence_length` characters of every stream, so row r of batch k+1 continues row r of batch k and
its final LSTM state is carried into it (truncated backpropagation through time).

`book`: the notebook's overlapping windows. Batch i starts at character 32 * i (the batch size);
row j starts one character after row j - 1. The batch-mean final state is carried to the next batch.
"""

from __future__ import annotations

import codecs
import gzip
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from dlfs_cli.config import Batching, EvalState
from dlfs_cli.data import Batches, DataBundle, DataInfo, too_few_to_validate
from dlfs_cli.errors import DlfsError

CORPORA = Path(__file__).with_name("corpora")
CORPUS_FILES = {"book": "dlfs_book_input.txt.gz", "tinyshakespeare": "tinyshakespeare.txt.gz"}


CHUNK = 1 << 20  # bytes read at a time: a text is never held whole, neither as bytes nor as a str
CODE_POINTS = 0x110000  # every Unicode character's code is below this


def _pieces(path: Path) -> Iterator[str]:
    """The text of a UTF-8 file (gzip-compressed if its name ends in .gz), a piece at a time; errors name the
    file and the place."""
    if not path.is_file():
        raise DlfsError(f"data.path: no such file: {path}")
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0  # bytes of the (decompressed) text decoded so far
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            while block := f.read(CHUNK):
                try:
                    yield decoder.decode(block)
                except UnicodeDecodeError as ex:  # ex.object: the bytes held back from the last block, then this
                    at = done + len(block) - len(ex.object) + ex.start
                    bad = ex.object[ex.start : ex.start + 1]
                    raise DlfsError(f"{path} is not UTF-8 text (byte {at}: {bad!r})") from None
                done += len(block)
            decoder.decode(b"", final=True)  # a character cut off by the end of the file
    except UnicodeDecodeError as ex:
        raise DlfsError(
            f"{path} is not UTF-8 text (it ends inside a character: byte {done - len(ex.object)})"
        ) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as ex:  # truncated, not gzip at all, corrupt
        raise DlfsError(f"{path}: not a gzip file that opens ({ex})") from None


def _codes(piece: str) -> np.ndarray:
    return np.frombuffer(piece.encode("utf-32-le"), dtype="<u4")


def read_corpus(path: Path, max_chars: int) -> tuple[str, Tensor]:
    """A text file as its sorted vocabulary and its characters' indices into it, in about one byte per
    character (a vocabulary of up to 256 characters; 2 or 4 beyond): two passes over the file, a piece at a
    time, the first for the vocabulary and the length (refused beyond max_chars, before more is read), the
    second for the indices. Held as one Python string and a list of indices, it took 18-27 bytes a character."""
    seen, n = np.zeros(CODE_POINTS, dtype=bool), 0
    for piece in _pieces(path):
        codes = _codes(piece)
        seen[codes] = True
        n += len(codes)
        if n > max_chars:
            raise DlfsError(f"{path}: more than data.max_chars={max_chars:,} characters; raise it to train on it all")
    if n == 0:
        raise DlfsError(f"{path} is empty")
    known = np.flatnonzero(seen)
    dtype = np.uint8 if len(known) <= 256 else np.int16 if len(known) <= 32768 else np.int32
    index = np.zeros(CODE_POINTS, dtype=dtype)
    index[known] = np.arange(len(known), dtype=dtype)
    ids, at = np.empty(n, dtype=dtype), 0
    for piece in _pieces(path):
        codes = _codes(piece)
        if at + len(codes) > n or not seen[codes].all():
            raise DlfsError(f"{path} changed while it was read; read it again when it is written")
        ids[at : at + len(codes)] = index[codes]
        at += len(codes)
    if at != n:
        raise DlfsError(f"{path} changed while it was read; read it again when it is written")
    return "".join(map(chr, known.tolist())), torch.from_numpy(ids)


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
            yield self.streams[:, t:end].long(), self.streams[:, t + 1 : end + 1].long()


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
            window = self.ids[self.rows + start].long()
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
            window = self.windows[i : i + self.batch].long()
            yield window[:, :-1], window[:, 1:]


def build(cfg: DictConfig, batch_size: int, seed: int, device: torch.device, reconstruct: bool) -> DataBundle:
    if reconstruct:
        raise DlfsError("data=text has no images to reconstruct; use data=mnist or data=digits")
    path = Path(cfg.path).expanduser() if cfg.path else CORPORA / CORPUS_FILES[cfg.corpus.value]
    vocab, ids = read_corpus(path, cfg.max_chars)
    # the book's split, by position: [training | test]; the validation text is the end of the training part
    n_train = int(len(ids) * cfg.train_fraction)
    n_val = int(n_train * cfg.val_fraction)
    L = cfg.sequence_length
    parts = (("training", n_train - n_val), ("validation", n_val), ("test", len(ids) - n_train))
    for part, size in parts:
        if size < L + 1 and (size or part != "validation"):
            raise DlfsError(
                f"{path}: {len(ids)} characters leave {size} for the {part} part, shorter than one window "
                f"of data.sequence_length + 1 = {L + 1}"
            )
    if cfg.val_fraction and not n_val:
        raise too_few_to_validate("text", cfg.val_fraction, n_train)
    ids = ids.to(device)
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
