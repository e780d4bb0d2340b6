"""The LSTM character model: batchings checked by hand on tiny strings, carried state, text-file
errors, generation, and a smoke run through train() and `dlfs generate`."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from dlfs_cli.config import DlfsError
from dlfs_cli.data import build_data
from dlfs_cli.data import text as text_data
from dlfs_cli.data.text import BookBatches, StreamBatches, WindowBatches, read_corpus
from dlfs_cli.evaluate import evaluate_run
from dlfs_cli.generate import sample
from dlfs_cli.models import NextCharacterModel
from dlfs_cli.train import train
from dlfs_cli.trainer import CarriedState, evaluate

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def decoded(batches) -> list[tuple[list[str], list[str]]]:
    """Each batch as (input rows, target rows) of letters."""
    letters = lambda t: ["".join(ALPHABET[i] for i in row) for row in t.tolist()]  # noqa: E731
    return [(letters(x), letters(y)) for x, y in batches]


def encode(chars: str, vocab: str) -> torch.Tensor:
    """Indices as read_corpus stores them: one byte each."""
    return torch.tensor([vocab.index(c) for c in chars], dtype=torch.uint8)


def test_a_corpus_is_its_sorted_vocabulary_and_one_byte_a_character(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("hello, world")
    vocab, ids = read_corpus(tmp_path / "t.txt", 100)
    assert vocab == " ,dehlorw" and ids.dtype == torch.uint8
    assert "".join(vocab[i] for i in ids.tolist()) == "hello, world"


@pytest.mark.parametrize("gz", [False, True])
def test_a_corpus_read_in_pieces_cut_inside_characters_is_the_whole_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gz: bool
) -> None:
    """Pieces of 7 bytes cut the 2-, 3- and 4-byte characters of UTF-8; a vocabulary of 300 characters is
    stored as int16; the indices are the text's, in code point order."""
    monkeypatch.setattr(text_data, "CHUNK", 7)
    chars = "Größe 日本語 🙂 naïve\r\n" * 5 + "".join(map(chr, range(0x400, 0x400 + 300)))
    path = tmp_path / ("t.txt.gz" if gz else "t.txt")
    path.write_bytes(gzip.compress(chars.encode()) if gz else chars.encode())
    vocab, ids = read_corpus(path, len(chars))
    assert vocab == "".join(sorted(set(chars))) and ids.dtype == torch.int16
    assert "".join(vocab[i] for i in ids.tolist()) == chars


def test_a_corpus_longer_than_max_chars_is_refused_before_it_is_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(text_data, "CHUNK", 10)
    (tmp_path / "t.txt").write_text("a" * 100)
    with pytest.raises(DlfsError, match=r"t\.txt: more than data\.max_chars=50 characters; raise it"):
        read_corpus(tmp_path / "t.txt", 50)
    assert read_corpus(tmp_path / "t.txt", 100)[1].numel() == 100


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"abc\xc3\xa9d\xffe", r"byte 6: b'\\xff'"), (b"abcdefgh\xe6\x97", "it ends inside a character: byte 8")],
)
def test_a_corpus_that_is_not_utf8_names_the_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, message: str
) -> None:
    monkeypatch.setattr(text_data, "CHUNK", 4)  # the bad byte in a later piece than the first
    (tmp_path / "t.txt").write_bytes(content)
    with pytest.raises(DlfsError, match=rf"t\.txt is not UTF-8 text \({message}"):
        read_corpus(tmp_path / "t.txt", 100)


@pytest.mark.parametrize("kind", [StreamBatches, BookBatches, WindowBatches])
def test_batches_of_one_byte_indices_are_int64_for_the_model(kind) -> None:
    x, y = next(iter(kind(encode(ALPHABET * 2, ALPHABET), batch_size=2, sequence_length=3)))
    assert x.dtype == y.dtype == torch.int64


def test_stream_batches_by_hand() -> None:
    # "abcdefghijklm" in 2 streams of 6 ("abcdef", "ghijkl"; "m" does not fit), windows of 3
    batches = StreamBatches(encode(ALPHABET[:13], ALPHABET), batch_size=2, sequence_length=3)
    assert decoded(batches) == [
        (["abc", "ghi"], ["bcd", "hij"]),
        (["de", "jk"], ["ef", "kl"]),  # the last window is shorter: a stream's last letter is only a target
    ]
    assert len(batches) == 2 and batches.carry == "rows"


def test_book_batches_by_hand() -> None:
    # the notebook's layout: batch i starts at letter 2 * i, row j one letter after row j - 1
    batches = BookBatches(encode(ALPHABET[:16], ALPHABET), batch_size=2, sequence_length=3)
    assert decoded(batches) == [
        (["abc", "bcd"], ["bcd", "cde"]),
        (["cde", "def"], ["def", "efg"]),
        (["efg", "fgh"], ["fgh", "ghi"]),
        (["ghi", "hij"], ["hij", "ijk"]),
        (["ijk", "jkl"], ["jkl", "klm"]),
    ]
    assert len(batches) == 5 and batches.carry == "mean"


def test_book_evaluation_windows_by_hand() -> None:
    batches = WindowBatches(encode(ALPHABET[:10], ALPHABET), batch_size=2, sequence_length=3)
    assert decoded(batches) == [(["abc", "def"], ["bcd", "efg"]), (["ghi"], ["hij"])]
    assert batches.carry is None


def test_carried_state_rows_and_mean() -> None:
    h = torch.arange(6.0, requires_grad=True).view(1, 3, 2)
    c = -h
    rows = CarriedState("rows")
    assert rows.take(3) is None  # a pass starts from zeros
    rows.keep((h, c))
    taken = rows.take(3)
    assert torch.equal(taken[0], h) and not taken[0].requires_grad  # detached: truncated backprop
    assert rows.take(2) is None  # a batch of another size cannot continue these rows
    mean = CarriedState("mean")
    mean.keep((h, c))
    h3, _ = mean.take(4)
    assert h3.shape == (1, 4, 2) and torch.equal(h3[0, 0], torch.tensor([2.0, 3.0]))


class SpyModel(NextCharacterModel):
    """Records the state each call receives and returns."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.calls: list[tuple] = []

    def forward(self, chars, state=None):
        out, new = super().forward(chars, state)
        self.calls.append((state, new, torch.is_grad_enabled()))
        return out, new


@pytest.mark.parametrize("batching", ["streams", "book"])
def test_state_is_carried_within_an_epoch_and_reset_between(make_cfg, tmp_path: Path, batching: str) -> None:
    from dlfs_cli.config import TrainerConfig
    from dlfs_cli.tracking import ProgressDisplay, RunFolder
    from dlfs_cli.trainer import Trainer

    text = tmp_path / "t.txt"
    text.write_text(ALPHABET * 40)
    cfg = make_cfg(
        "model=lstm_charmodel",
        f"data.path={text}",
        f"data.batching={batching}",
        "data.sequence_length=5",
        "trainer.batch_size=4",
    )
    data = build_data(cfg.data, 4, 0)
    model = SpyModel(vocab_size=len(data.info.vocab), hidden_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = RunFolder(tmp_path / "run")
    run.start(cfg, {}, ["loss", "bpc", "accuracy"])
    cpu = torch.device("cpu")
    trainer = Trainer(model, optimizer, None, TrainerConfig(limit_batches=3), "cross_entropy", cpu, run, {})
    for _ in range(2):  # two epochs
        trainer._train_epoch(data.train, None, ProgressDisplay(2, 3), 1)
        trainer.batch = 0  # as fit() does at the end of an epoch
    first, second = model.calls[:3], model.calls[3:6]
    for epoch in (first, second):
        assert epoch[0][0] is None  # each epoch starts from zeros
        for (_, out, _), (given, _, _) in zip(epoch, epoch[1:], strict=False):
            expected = out[0] if batching == "streams" else out[0].mean(1, keepdim=True).expand_as(out[0])
            assert torch.equal(given[0], expected.detach()) and not given[0].requires_grad
    training_state = trainer.carried.state
    model.calls.clear()
    evaluate(model, data.test, "cross_entropy", torch.device("cpu"))
    assert model.calls[0][0] is None and not any(grad for _, _, grad in model.calls)  # own state, no gradients
    assert trainer.carried.state is training_state  # evaluation left the training state alone
    run.close()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"\xff\xfe\x00bad", "is not UTF-8"),
        (b"too short", "shorter than one window"),
    ],
)
def test_text_file_errors_name_the_file(make_cfg, tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "my.txt"
    path.write_bytes(content)
    with pytest.raises(DlfsError, match=rf"my\.txt.*{message}|{message}.*my\.txt|my\.txt is"):
        build_data(make_cfg("model=lstm_charmodel", f"data.path={path}").data, 32, 0)
    with pytest.raises(DlfsError, match="no such file"):
        read_corpus(tmp_path / "missing.txt", 100)


def test_bundled_corpora_and_the_books_split(make_cfg) -> None:
    data = build_data(make_cfg("model=lstm_charmodel").data, 32, 0)
    assert len(data.info.vocab) == 62 and data.info.n_train + data.info.n_val + data.info.n_test == 99_993
    assert data.info.n_train + data.info.n_val == int(99_993 * 0.8)  # the book's 80%, its last tenth validates
    assert data.info.n_val == int(int(99_993 * 0.8) * 0.1)


def test_generation_is_deterministic_for_a_seed() -> None:
    torch.manual_seed(0)
    model = NextCharacterModel(vocab_size=len(ALPHABET), hidden_size=16)
    a = sample(model, ALPHABET, "abc", 40, 1.0, seed=3, device=torch.device("cpu"))
    assert a == sample(model, ALPHABET, "abc", 40, 1.0, seed=3, device=torch.device("cpu"))
    assert a != sample(model, ALPHABET, "abc", 40, 1.0, seed=4, device=torch.device("cpu"))
    assert len(a) == 43 and a.startswith("abc")
    greedy = sample(model, ALPHABET, "abc", 20, 0.0, seed=1, device=torch.device("cpu"))
    assert greedy == sample(model, ALPHABET, "abc", 20, 0.0, seed=2, device=torch.device("cpu"))
    with pytest.raises(DlfsError, match="outside the run's vocabulary: 'XY'"):
        sample(model, ALPHABET, "aXY", 5, 1.0, 0, torch.device("cpu"))


class NotToBeCalled(torch.nn.Module):
    def forward(self, *args):
        raise AssertionError("sampling started")


@pytest.mark.parametrize("length", [10**7 + 1, 3_000_000_000, 2**63 - 1])
def test_a_length_beyond_the_bound_is_refused_before_sampling(length: int) -> None:
    # one model call a character: 3e9 of them would run for weeks with no output
    with pytest.raises(DlfsError, match=rf"^invalid value for length: {length} \(must be between 0 and 10000000\)$"):
        sample(NotToBeCalled(), ALPHABET, "abc", length, 1.0, 0, torch.device("cpu"))


@pytest.mark.parametrize("batching", ["streams", "book", "book-carried"])
def test_smoke_run_then_generate(run_here, make_cfg, tmp_path: Path, batching: str) -> None:
    """book-carried: the book's evaluation from the state carried out of training, which last.pt holds:
    `dlfs eval` recomputes the same numbers from it."""
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 30)
    run = tmp_path / "run"
    batching, _, carried = batching.partition("-")
    cfg = make_cfg(
        "model=lstm_charmodel",
        f"data.path={text}",
        f"data.batching={batching}",
        f"data.eval_state={carried or 'zeros'}",
        "model.hidden_size=16",
        "trainer.epochs=2",
        "trainer.batch_size=8",
        "device=cpu",
    )
    metrics = train(cfg, run)
    assert set(metrics) == {f"{split}_{m}" for split in ("val", "test") for m in ("loss", "bpc", "accuracy")}
    assert metrics["test_bpc"] == pytest.approx(metrics["test_loss"] / 0.6931471805599453)
    assert len((run / "samples.txt").read_text()) > 300
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["vocab"] == "".join(sorted(set(text.read_text())))
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    result = evaluate_run(run, "last")  # the config comes back typed (corpus, batching are enums)
    assert result["recomputed"] == result["recorded"] == metrics
    if batching == "streams":  # the CLI, in a fresh process: the same text twice for a seed
        outs = [run_here("generate", f"run={run}", "length=300", "seed=3", cwd=tmp_path) for _ in range(2)]
        assert all(o.returncode == 0 for o in outs), outs[0].stderr
        assert outs[0].stdout == outs[1].stdout and len(outs[0].stdout) >= 300
        huge = run_here("generate", f"run={run}", "length=3000000000", cwd=tmp_path)  # refused, not hung
        assert huge.returncode == 2 and huge.stdout == "" and "Traceback" not in huge.stderr
        assert len(huge.stderr.strip().splitlines()) == 1 and huge.stderr.startswith("dlfs")
        assert "invalid value for length: 3000000000 (must be between 0 and 10000000)" in huge.stderr


def test_generate_errors_are_one_line(run_here, tmp_path: Path) -> None:
    for args, message in (
        (["run=nowhere"], "run=nowhere: no such folder"),
        ([], "dlfs generate needs a run folder"),
        (["run=x", "temperature=-1"], "invalid value for temperature"),
    ):
        out = run_here("generate", *args, cwd=tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr


def test_the_books_evaluation_starts_every_window_from_the_training_state() -> None:
    """data.eval_state=carried: each held-out window starts from the batch mean of the state carried out of
    training (the book's notebook: h.expand(1, m, H)), not from zeros; evaluation leaves that state alone."""
    torch.manual_seed(0)
    model = NextCharacterModel(vocab_size=len(ALPHABET), hidden_size=8).eval()
    ids = encode("thequickbrownfoxjumpsoverthelazydog" * 3, ALPHABET)
    state = (torch.randn(1, 4, 8), torch.randn(1, 4, 8))  # a training batch of 4 rows
    kept = tuple(s.clone() for s in state)
    carried = evaluate(
        model, WindowBatches(ids, 5, 6, True), "cross_entropy", torch.device("cpu"), training_state=state
    )
    zeros = evaluate(model, WindowBatches(ids, 5, 6), "cross_entropy", torch.device("cpu"), training_state=state)
    assert all(torch.equal(a, b) for a, b in zip(state, kept, strict=True))
    windows = WindowBatches(ids, 1000, 6).windows.long()  # every window at once, as the notebook did
    h, c = (s.mean(1, keepdim=True).expand(1, len(windows), 8).contiguous() for s in state)
    with torch.no_grad():
        out, _ = model(windows[:, :-1], (h, c))
        book = torch.nn.functional.cross_entropy(out, windows[:, 1:]).item()
    assert carried["test_loss"] == pytest.approx(book, rel=1e-6)
    assert zeros["test_loss"] != pytest.approx(book, rel=1e-3)


def test_sampling_runs_on_one_thread_and_gives_the_count_back() -> None:
    """A model call per character is too small to share among threads: on a busy machine two threads took 17 ms
    a character, one 0.4 ms. The process's count is put back (a run samples at its end; a sweep goes on)."""
    seen: list[int] = []

    class Counting(torch.nn.Module):
        def forward(self, x: torch.Tensor, state=None):
            seen.append(torch.get_num_threads())
            return torch.zeros(1, 3, x.shape[1]), state

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert len(sample(Counting(), "abc", "a", 5, 1.0, 0, torch.device("cpu"))) == 6
        assert seen == [1] * 6 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
