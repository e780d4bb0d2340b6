"""The spread of the book's own code: each script of the shared bench/ run at several seeds, the numbers
`dlfs reproduce`'s two-sided bands are derived from (conf/reproduce.yaml, `reference:` of each target).

    python tests/benchmarks/book_spread.py [--only boston,mnist,lstm,autoencoder] [--seeds 0-4]

Boston takes seeds 0-9 (a fraction of a second each), the others 0-4 (MNIST 14/7 through the book's
DataLoader: about 20-100 s a seed on 2 cores). Writes results/book_spread.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import RESULTS, SHARED

BENCH, DATA = SHARED / "bench", SHARED / "data"
# name: (the command at a seed, the printed value's pattern, the metric it is, default seeds)
EXPERIMENTS = {
    "boston": (
        lambda s: ([sys.executable, str(BENCH / "book_boston.py"), str(DATA / "boston_house_prices.csv"), str(s)], {}),
        r"\bmse=([0-9.]+)",
        "book_boston test_mse",
        range(10),
    ),
    "mnist": (
        lambda s: ([sys.executable, str(BENCH / "book_mnist.py"), str(DATA), "loader"], {"CHANNELS": "14,7"}),
        r"test_acc=([0-9.]+)",
        "book_mnist_cnn test_accuracy (14/7 channels, the book's DataLoader)",
        range(5),
    ),
    "lstm": (
        lambda s: ([sys.executable, str(BENCH / "book_lstm.py"), str(DATA / "text" / "dlfs_book_input.txt")], {}),
        r"val_loss=([0-9.]+)",
        "book_lstm_charmodel test_loss (the book's evaluation, from the carried state)",
        range(5),
    ),
    "autoencoder": (
        lambda s: ([sys.executable, str(BENCH / "book_autoencoder.py"), str(DATA)], {}),
        r"test_mse=([0-9.]+)",
        "book_autoencoder test_mse",
        range(5),
    ),
}


def run(name: str, seed: int) -> tuple[float, float, str]:
    command, pattern, _, _ = EXPERIMENTS[name]
    args, env = command(seed)
    t0 = time.monotonic()
    out = subprocess.run(args, env=os.environ | env | {"SEED": str(seed)}, capture_output=True, text=True, check=True)
    found = re.findall(pattern, out.stdout, re.IGNORECASE)
    if not found:
        raise SystemExit(f"{name} seed {seed}: no value in its output:\n{out.stdout}{out.stderr}")
    return float(found[-1]), time.monotonic() - t0, out.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join(EXPERIMENTS))
    parser.add_argument("--seeds", default=None, help="e.g. 0-4 (default: each experiment's own)")
    args = parser.parse_args()
    if not BENCH.is_dir():
        raise SystemExit(f"needs the project's shared folder: {BENCH} is missing")
    path = RESULTS / "book_spread.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.only.split(","):
        seeds = EXPERIMENTS[name][3]
        if args.seeds:
            lo, _, hi = args.seeds.partition("-")
            seeds = range(int(lo), int(hi or lo) + 1)
        values, lines = [], []
        for seed in seeds:
            value, seconds, line = run(name, seed)
            print(f"{name} seed {seed}: {value} ({seconds:.0f} s) | {line}", flush=True)
            values.append(value)
            lines.append(line)
        results[name] = {
            "what": EXPERIMENTS[name][2],
            "script": f"shared/bench/{Path(EXPERIMENTS[name][0](0)[0][1]).name}",
            "seeds": list(seeds),
            "values": values,
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values),
            "outputs": lines,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{os.cpu_count()} CPUs",
        }
        path.write_text(json.dumps(results, indent=2) + "\n")
    md = ["The book's own code at several seeds (tests/benchmarks/book_spread.py)", ""]
    md += ["| experiment | seeds | values | mean | std (n-1) | measured |", "|---|---|---|---|---|---|"]
    for r in results.values():
        seeds = f"{r['seeds'][0]}-{r['seeds'][-1]}"
        values = " ".join(f"{v:.4g}" for v in r["values"])
        md.append(f"| {r['what']} | {seeds} | {values} | {r['mean']:.4g} | {r['std']:.2g} | {r['date']} |")
    (RESULTS / "book_spread.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
