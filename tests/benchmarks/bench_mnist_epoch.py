"""One book MNIST epoch: dlfs's two data paths against the book's own pipeline, timed alternately.

    python tests/benchmarks/bench_mnist_epoch.py [DATA_ROOT] [ROUNDS]

DATA_ROOT holds MNIST/raw/ (default ../shared/data). Each round runs the book's script with its
DataLoader (`loader`) and with its bare loop over pre-normalised tensors (`tensor`: the floor for
this model without a runner), then `dlfs train experiment=book_mnist_cnn` on the tensor path and on
the torchvision path (figures off). Epoch time: the book script's epoch_s; dlfs's elapsed_s at the
epoch's last step in metrics.csv. Results: tests/benchmarks/results/mnist_epoch.md.
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


def book(data_root: str, mode: str) -> dict[str, float]:
    out, wall = timed([sys.executable, str(SHARED / "bench" / "book_mnist.py"), data_root, mode])
    m = re.search(r"epoch_s=([\d.]+) test_acc=([\d.]+)", out)
    return {"epoch_s": float(m.group(1)), "process_s": wall, "accuracy": float(m.group(2))}


def ours(data_root: str, pipeline: str, work: Path) -> dict[str, float]:
    run = work / f"{pipeline}-{time.time_ns()}"
    _, wall = timed(
        dlfs(
            "train",
            "experiment=book_mnist_cnn",
            f"data.root={data_root}",
            f"data.pipeline={pipeline}",
            "figures.enabled=false",
            "device=cpu",
            f"hydra.run.dir={run}",
        )
    )
    with open(run / "metrics.csv", newline="") as f:
        epoch_s = max(float(r["elapsed_s"]) for r in csv.DictReader(f) if r["split"] == "train")
    accuracy = json.loads((run / "summary.json").read_text())["metrics"]["test_accuracy"]
    return {"epoch_s": epoch_s, "process_s": wall, "accuracy": accuracy}


def main() -> None:
    data_root = sys.argv[1] if len(sys.argv) > 1 else str(SHARED / "data")
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    with tempfile.TemporaryDirectory() as tmp:
        results = alternate(
            {
                "book loader": lambda: book(data_root, "loader"),
                "book tensor": lambda: book(data_root, "tensor"),
                "dlfs tensor": lambda: ours(data_root, "tensor", Path(tmp)),
                "dlfs torchvision": lambda: ours(data_root, "torchvision", Path(tmp)),
            },
            rounds,
        )
    print(
        report(
            "One book MNIST epoch", results, ["epoch_s", "process_s", "accuracy"], "epoch_s", False, "mnist_epoch.md"
        )
    )


if __name__ == "__main__":
    main()
