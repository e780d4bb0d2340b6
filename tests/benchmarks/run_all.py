"""`make bench`: every benchmark in turn, then one table of the project's speed targets.

    python tests/benchmarks/run_all.py [--quick | --table]

Each benchmark alternates its sides round after round in one run and reports medians and the
median of the per-round ratios (results/<name>.md and .json). The benchmarks that compare against
the book's own pipelines need the project's shared folder (../shared: bench/ and data/); without
it they are skipped and say so. --quick: one round each (a smoke test of the benchmarks, not figures
to quote). The table goes to results/SUMMARY.md. --table: only the table, from the results files as
they are (after re-running one benchmark by itself).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from harness import RESULTS, SHARED

HERE = Path(__file__).resolve().parent
# script, rounds, the shared files it needs
BENCHMARKS = [
    ("bench_cli.py", 6, []),
    ("bench_overhead.py", 8, []),
    ("bench_sweep.py", 4, []),
    ("bench_runs.py", 6, []),
    ("bench_text_memory.py", 2, []),
    ("bench_generate.py", 2, []),
    ("bench_lstm.py", 4, [SHARED / "bench" / "book_lstm.py", SHARED / "data" / "text"]),
    ("bench_mnist_epoch.py", 2, [SHARED / "bench" / "book_mnist.py", SHARED / "data" / "MNIST"]),
]


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text())["sides"] if path.exists() else {}


def targets() -> list[tuple[str, str, float | None, str, bool | None]]:
    """(what, measure, value, target, met) from the benchmarks' result files."""
    cli, mnist, cnn, mlp = load("cli"), load("mnist_epoch"), load("overhead_digits"), load("overhead_boston")
    lstm, sweep, runs, text = load("lstm"), load("sweep"), load("runs"), load("text_memory")
    sampling = load("generate")

    def side(table: dict, name: str, key: str) -> float | None:
        return table.get(name, {}).get(key)

    def row(what: str, measure: str, value: float | None, target: str, ok) -> tuple:
        return (what, measure, value, target, None if value is None or ok is None else ok(value))

    fast_t97 = side(mnist, "dlfs fast_mnist_cnn", "t97_s")
    default = "dlfs (fp32, default)"
    return [
        row("`dlfs --help`", "s, whole process", side(cli, "dlfs --help", "seconds"), "<= 0.5 s", lambda v: v <= 0.5),
        row(
            "`dlfs train --cfg job`", "s", side(cli, "dlfs train --cfg job", "seconds"), "<= 1.0 s", lambda v: v <= 1.0
        ),
        row("`dlfs runs` (20 runs)", "s", side(cli, "dlfs runs (20 runs)", "seconds"), "-", None),
        row(
            "`dlfs runs` (2,000 runs)",
            "s, whole process",
            side(runs, "dlfs runs (2,000 runs)", "seconds"),
            "<= 2 s",
            at_most(2.0),
        ),
        row(
            "`dlfs generate`, both cores busy",
            "ms a character",
            side(sampling, "busy, one thread (dlfs)", "ms_per_char"),
            "(reported)",
            None,
        ),
        row(
            "reading a 50 MB text (LSTM data)",
            "bytes per character",
            side(text, "build_data, plain", "bytes_per_char"),
            "<= 4",
            at_most(4.0),
        ),
        row(
            "book MNIST epoch, fp32 default",
            "x book_mnist.py",
            side(mnist, default, "ratio"),
            "<= 0.45x",
            at_most(0.45),
        ),
        row(
            "book MNIST epoch training time, fp32 default",
            "x book tensor loop",
            side(mnist, default, "epoch_x_tensor"),
            "<= 0.75x",
            at_most(0.75),
        ),
        row("  its test accuracy", "", side(mnist, default, "accuracy"), ">= 0.965", lambda v: v >= 0.965),
        row("  with channels_last", "x", side(mnist, "dlfs channels_last", "ratio"), "(reported)", None),
        row("  with bf16 + channels_last", "x", side(mnist, "dlfs bf16 + channels_last", "ratio"), "(reported)", None),
        row("`fast_mnist_cnn` time to 97%", "s of training", fast_t97, "(reported)", None),
        row(
            "runner step, digits CNN",
            "x bare loop",
            side(cnn, "digits CNN: dlfs Trainer", "ratio"),
            "<= 1.03x",
            at_most(1.03),
        ),
        row(
            "runner step, Boston MLP", "x bare loop", side(mlp, "Boston MLP: dlfs Trainer", "ratio"), "(reported)", None
        ),
        row(
            "LSTM characters per second", "x book_lstm.py", side(lstm, "dlfs", "ratio"), ">= 0.95x", lambda v: v >= 0.95
        ),
        row(
            "4-job sweep, joblib",
            "x basic launcher",
            side(sweep, "joblib, 2 at a time", "ratio"),
            "<= 0.7x",
            at_most(0.7),
        ),
    ]


def at_most(limit: float):
    return lambda v: v <= limit


def summary_table(rebuilt: bool = False) -> str:
    """The targets' table; `rebuilt` (--table): from results files measured earlier, maybe elsewhere,
    so the header names no machine or time of its own, only each file's date."""
    where = "from the results files" if rebuilt else f"{platform.node()}, {os.cpu_count()} CPUs"
    lines = [
        f"Speed targets: {time.strftime('%Y-%m-%d %H:%M')}, {where}, no GPU (GPU targets: not measured on GPU)",
        "",
        "measured: "
        + ", ".join(
            f"{path.stem} {json.loads(path.read_text()).get('date', '?')}"
            for path in sorted(RESULTS.glob("*.json"))
            if path.stem != "book_spread"
        ),
        "",
        "| benchmark | measure | result | target | met |",
        "|---|---|---|---|---|",
    ]
    for what, measure, value, target, met in targets():
        # ratios to 3 decimals: a verdict at a target's edge (1.031x against <= 1.03x) shows why
        shown = "not run" if value is None else (f"{value:.3f}x" if measure.startswith("x") else f"{value:.3g}")
        lines.append(f"| {what} | {measure} | {shown} | {target} | {'-' if met is None else 'yes' if met else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    quick = "--quick" in sys.argv
    for script, rounds, needs in [] if "--table" in sys.argv else BENCHMARKS:
        missing = [str(p) for p in needs if not p.exists()]
        if missing:
            print(f"== {script}: skipped, missing {', '.join(missing)}", flush=True)
            continue
        print(f"== {script} ({1 if quick else rounds} rounds)", flush=True)
        args = [str(SHARED / "data")] if script == "bench_mnist_epoch.py" else []
        subprocess.run([sys.executable, str(HERE / script), *args, str(1 if quick else rounds)], check=True, cwd=HERE)
    table = summary_table(rebuilt="--table" in sys.argv)
    (RESULTS / "SUMMARY.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
