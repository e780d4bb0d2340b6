"""One book MNIST epoch: dlfs's tensor path against the book's own pipeline, timed alternately.

    python tests/benchmarks/bench_mnist_epoch.py [DATA_ROOT] [ROUNDS]

DATA_ROOT holds MNIST/raw/ (default ../shared/data). Each round runs, one after the other:
the book's script (../shared/bench/book_mnist.py DATA_ROOT loader), the same script's bare loop over
pre-normalised tensors (`tensor`: the floor for this model without the runner), then
`dlfs train experiment=book_mnist_cnn` (tensor path, figures off), then the same with
data.pipeline=torchvision. Reported: the epoch's training time (the book script's epoch_s; dlfs's
elapsed_s at the epoch's last step in metrics.csv), the whole process, and test accuracy; medians
and ratios against the book's loader. Appends a row per run to tests/benchmarks/results/.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"


def run_book(data_root: str, mode: str) -> dict[str, float]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(SHARED / "bench" / "book_mnist.py"), data_root, mode],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    wall = time.perf_counter() - t0
    m = re.search(r"epoch_s=([\d.]+) test_acc=([\d.]+)", out)
    return {"epoch_s": float(m.group(1)), "process_s": wall, "accuracy": float(m.group(2))}


def run_dlfs(data_root: str, pipeline: str, work: Path) -> dict[str, float]:
    run = work / f"dlfs-{pipeline}-{time.time_ns()}"
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dlfs_cli",
            "train",
            "experiment=book_mnist_cnn",
            f"data.root={data_root}",
            f"data.pipeline={pipeline}",
            "figures.enabled=false",
            "device=cpu",
            f"hydra.run.dir={run}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - t0
    with open(run / "metrics.csv", newline="") as f:
        epoch_s = max(float(r["elapsed_s"]) for r in csv.DictReader(f) if r["split"] == "train")
    summary = json.loads((run / "summary.json").read_text())
    return {"epoch_s": epoch_s, "process_s": wall, "accuracy": summary["metrics"]["test_accuracy"]}


def main() -> None:
    data_root = sys.argv[1] if len(sys.argv) > 1 else str(SHARED / "data")
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    names = ("book loader", "book tensor", "dlfs tensor", "dlfs torchvision")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, fn in (
                ("book loader", lambda: run_book(data_root, "loader")),
                ("book tensor", lambda: run_book(data_root, "tensor")),
                ("dlfs tensor", lambda: run_dlfs(data_root, "tensor", Path(tmp))),
                ("dlfs torchvision", lambda: run_dlfs(data_root, "torchvision", Path(tmp))),
            ):
                results[name].append(fn())
                print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)
    base = statistics.median(x["epoch_s"] for x in results["book loader"])
    lines = [
        f"# MNIST epoch benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, "
        f"{os.cpu_count()} CPUs, {rounds} rounds alternating, medians",
        "| pipeline | epoch s | process s | test accuracy | epoch time vs book loader |",
        "|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        epoch = statistics.median(x["epoch_s"] for x in rows)
        proc = statistics.median(x["process_s"] for x in rows)
        acc = statistics.median(x["accuracy"] for x in rows)
        lines.append(f"| {name} | {epoch:.1f} | {proc:.1f} | {acc:.4f} | {epoch / base:.2f}x |")
    report = "\n".join(lines)
    print(report)
    out = ROOT / "tests" / "benchmarks" / "results" / "mnist_epoch.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(report + "\n")


if __name__ == "__main__":
    main()
