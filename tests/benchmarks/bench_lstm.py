"""The book's LSTM run: training throughput of `dlfs train experiment=book_lstm_charmodel` against
the book's own pipeline (../shared/bench/book_lstm.py) on the same corpus, timed alternately.

    python tests/benchmarks/bench_lstm.py [ROUNDS]

Throughput is characters per second of training (batches x batch size x sequence length over the
epoch's training time: the book script's s; dlfs's elapsed_s at the last step in metrics.csv).
Results: tests/benchmarks/results/lstm.md.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from harness import SHARED, alternate, dlfs, report, timed

CORPUS = SHARED / "data" / "text" / "dlfs_book_input.txt"
BATCH, LENGTH = 32, 50  # the book preset's


def book() -> dict[str, float]:
    out, wall = timed([sys.executable, str(SHARED / "bench" / "book_lstm.py"), str(CORPUS)])
    m = re.search(r"batches=(\d+) s=([\d.]+) val_loss=([\d.]+) chars_per_s=(\d+)", out)
    return {
        "chars_per_s": float(m.group(4)),
        "train_s": float(m.group(2)),
        "process_s": wall,
        "test_loss": float(m.group(3)),
    }


def ours(work: Path) -> dict[str, float]:
    run = work / f"lstm-{time.time_ns()}"
    _, wall = timed(
        dlfs(
            "train",
            "experiment=book_lstm_charmodel",
            f"data.path={CORPUS}",
            "figures.enabled=false",
            "device=cpu",
            f"hydra.run.dir={run}",
        )
    )
    with open(run / "metrics.csv", newline="") as f:
        last = [r for r in csv.DictReader(f) if r["split"] == "train"][-1]
    train_s, steps = float(last["elapsed_s"]), int(last["step"])
    test_loss = json.loads((run / "summary.json").read_text())["metrics"]["test_loss"]
    return {
        "chars_per_s": steps * BATCH * LENGTH / train_s,
        "train_s": train_s,
        "process_s": wall,
        "test_loss": test_loss,
    }


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    with tempfile.TemporaryDirectory() as tmp:
        results = alternate({"book_lstm.py": book, "dlfs": lambda: ours(Path(tmp))}, rounds)
    print(
        report(
            "The book's LSTM run (1 epoch)",
            results,
            ["chars_per_s", "train_s", "process_s", "test_loss"],
            "chars_per_s",
            True,
            "lstm.md",
        )
    )


if __name__ == "__main__":
    main()
