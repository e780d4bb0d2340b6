"""What the benchmarks share: run each side in turn, round after round, and report medians and ratios."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
RESULTS = Path(__file__).resolve().parent / "results"

Measure = Callable[[], dict[str, float]]


def alternate(sides: dict[str, Measure], rounds: int) -> dict[str, list[dict[str, float]]]:
    """Each round runs every side once, so that the machine's drift hits all sides alike, starting one
    side later each round: where a side runs in its round matters too (in one process, in 5 of 6 rounds
    the second of two sides ran 12-28% slower, whichever it was, measured once on this project's
    2-core machine), and over a multiple of len(sides) rounds each side takes each place equally often."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            results[name].append(sides[name]())
            print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)
    return results


def block_ratios(rows: list[dict[str, float]], base: list[dict[str, float]], key: str, k: int) -> list[float]:
    """One ratio per block of k consecutive rounds, k the number of sides: over a block each side has
    taken each place in the order once, so the order's effect cancels (a ratio per round would carry
    it, biased up and down in turn). The geometric mean of the side's values over the block, over the
    first side's. Fewer rounds than sides: one block of them all (the order then only partly balanced)."""
    k = min(k, len(rows))
    starts = range(0, len(rows) - k + 1, k)
    return [
        statistics.geometric_mean(x[key] for x in rows[i : i + k])
        / statistics.geometric_mean(b[key] for b in base[i : i + k])
        for i in starts
    ]


def report(
    title: str,
    results: dict[str, list[dict[str, float]]],
    columns: list[str],
    ratio_of: str,
    higher_is_better: bool,
    file: str,
) -> str:
    """A markdown table of medians, and each side's ratio to the first side on `ratio_of`: the median of
    the per-block ratios (each taken within one block of rounds, so that the machine's drift and the
    order's effect cancel); also saved."""
    rounds = len(next(iter(results.values())))
    base_rows = next(iter(results.values()))
    k = min(len(results), rounds)
    lines = [
        f"{title}: {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} CPUs ({cpu_model()}), "
        f"{rounds} rounds alternating, medians",
        "",
        "| side | "
        + " | ".join(columns)
        + f" | {ratio_of} vs {next(iter(results))} (median of the ratios of blocks of {k} rounds) |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    sides = {}
    for name, rows in results.items():
        med = {c: statistics.median(x[c] for x in rows) for c in columns}
        ratios = block_ratios(rows, base_rows, ratio_of, len(results))
        sides[name] = med | {"ratio": statistics.median(ratios)}
        spread = f" (blocks {min(ratios):.2f}-{max(ratios):.2f})" if name != next(iter(results)) else ""
        cells = " | ".join(f"{med[c]:,.0f}" if med[c] >= 1000 else f"{med[c]:.4g}" for c in columns)
        better = " (higher is better)" if higher_is_better else ""
        lines.append(f"| {name} | {cells} | {statistics.median(ratios):.2f}x{better}{spread} |")
    text = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / file).write_text(text + "\n")
    (RESULTS / file).with_suffix(".json").write_text(
        json.dumps(
            {
                "title": title,
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "cpu": cpu_model(),
                "cpus": os.cpu_count(),
                "rounds": rounds,
                "sides": sides,
            },
            indent=2,
        )
    )
    return text


def cpu_model() -> str:
    """The CPU's model name and the widest vector extensions that matter to torch's CPU kernels (a
    results file is about one machine: the same code is other figures on another CPU)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:  # not Linux
        pass
    extensions = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {' '.join(extensions) or 'no AVX2'}"


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run a command (with `env` added to this one's); its stdout and the whole process's wall time."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **(env or {})}).stdout
    return out, time.perf_counter() - t0


def dlfs(*args: str) -> list[str]:
    return [sys.executable, "-m", "dlfs_cli", *args]
