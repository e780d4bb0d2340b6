"""The memory of reading a 50 MB text for the LSTM (issue 25's target: a few bytes per character).

    python tests/benchmarks/bench_text_memory.py [ROUNDS]

Each measurement is a fresh process: it imports torch and dlfs, notes its peak resident memory, reads the
text, and reports how far the peak rose, per character. Sides:
- `read_corpus`: the vocabulary and the indices (dlfs_cli.data.text), from a plain file, from the same text
  gzip-compressed, and from a 50 MB text with non-ASCII characters (a vocabulary of over 256 characters);
- `build_data`: the whole of what `dlfs train model=lstm_charmodel data.path=...` builds from it (the split,
  the training streams, the held-out batches);
- `as before`: the text read whole into a str and encoded through a Python list into int64 (dlfs up to
  8d27483), for comparison.
The texts are the bundled tinyshakespeare repeated to 50 MB. Results: tests/benchmarks/results/text_memory.md.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import ROOT, alternate, report

SIZE = 50_000_000  # characters

MEASURE = """
import json, resource, sys
from pathlib import Path
import torch
from dlfs_cli.data import text
path, how = Path(sys.argv[1]), sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if how == "read_corpus":
    vocab, ids = text.read_corpus(path, 10**10)
    n = ids.numel()
elif how == "build_data":
    from hydra import compose, initialize_config_dir
    from dlfs_cli.config import conf_dir, register_configs
    from dlfs_cli.data import build_data
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=lstm_charmodel", f"data.path={path}"])
    data = build_data(cfg.data, cfg.trainer.batch_size, 0)
    n = data.info.n_train + data.info.n_val + data.info.n_test
else:  # as dlfs read a text up to 8d27483
    raw = path.read_bytes()
    chars = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    vocab = "".join(sorted(set(chars)))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in chars], dtype=torch.int64)
    n = ids.numel()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"bytes_per_char": (after - before) * 1024 / n, "peak_rise_mb": (after - before) / 1024}))
"""


def texts(work: Path) -> dict[str, Path]:
    corpus = gzip.decompress((ROOT / "dlfs_cli" / "data" / "corpora" / "tinyshakespeare.txt.gz").read_bytes()).decode()
    ascii_text = (corpus * (SIZE // len(corpus) + 1))[:SIZE]
    # the same text with 400 other characters (Cyrillic and CJK) spread through it: UTF-8 of 1-3 bytes each
    others = "".join(chr(c) for c in [*range(0x410, 0x450), *range(0x4E00, 0x4E00 + 336)])
    step = len(ascii_text) // (4 * len(others))
    mixed = "".join(ascii_text[i * step : (i + 1) * step] + others[i % len(others)] for i in range(SIZE // step))
    files = {"plain": work / "text.txt", "gz": work / "text.txt.gz", "non-ASCII": work / "mixed.txt"}
    files["plain"].write_text(ascii_text, encoding="utf-8")
    files["gz"].write_bytes(gzip.compress(ascii_text.encode(), compresslevel=1))
    files["non-ASCII"].write_text(mixed[:SIZE], encoding="utf-8")
    return files


def measure(path: Path, how: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), how], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    with tempfile.TemporaryDirectory() as tmp:
        files = texts(Path(tmp))
        sides = {
            "as before (8d27483), plain": lambda: measure(files["plain"], "before"),
            "read_corpus, plain": lambda: measure(files["plain"], "read_corpus"),
            "read_corpus, .gz": lambda: measure(files["gz"], "read_corpus"),
            "read_corpus, non-ASCII": lambda: measure(files["non-ASCII"], "read_corpus"),
            "build_data, plain": lambda: measure(files["plain"], "build_data"),
        }
        results = alternate(sides, rounds)
    title = "Peak memory of reading a 50 MB text (rise of the process's peak RSS)"
    print(report(title, results, ["bytes_per_char", "peak_rise_mb"], "bytes_per_char", False, "text_memory.md"))


if __name__ == "__main__":
    main()
