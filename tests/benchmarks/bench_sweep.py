"""A parallel sweep against the same sweep run one job after another (issue 6's target: <= 0.7x).

    python tests/benchmarks/bench_sweep.py [ROUNDS]

The sweep: 4 jobs of `dlfs train -m model=mnist_cnn data=digits trainer.epochs=3 seed=1,2,3,4`,
whole process (Hydra, the jobs, summary.csv); once with Hydra's basic launcher (one job at a time,
torch's default threads), once with `hydra/launcher=joblib hydra.launcher.n_jobs=2` (two jobs at a
time, each with cores / 2 threads). Results: tests/benchmarks/results/sweep.md.
"""

from __future__ import annotations

import csv
import sys
import tempfile
import time
from pathlib import Path

from harness import alternate, dlfs, report, timed

SWEEP = ["model=mnist_cnn", "data=digits", "trainer.epochs=3", "seed=1,2,3,4", "figures.enabled=false", "device=cpu"]
LAUNCHERS = {"basic": [], "joblib, 2 at a time": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]}


def sweep(work: Path, launcher: list[str]) -> dict[str, float]:
    folder = work / f"sweep-{time.time_ns()}"
    _, wall = timed(dlfs("train", "-m", *SWEEP, *launcher, f"hydra.sweep.dir={folder}"))
    with open(folder / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows), rows
    return {"wall_s": wall, "mean_test_accuracy": sum(float(r["test_accuracy"]) for r in rows) / 4}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = alternate({name: (lambda a=args: sweep(work, a)) for name, args in LAUNCHERS.items()}, rounds)
    print(
        report(
            "4-job sweep (mnist_cnn on digits, 3 epochs each), whole process",
            results,
            ["wall_s", "mean_test_accuracy"],
            ratio_of="wall_s",
            higher_is_better=False,
            file="sweep.md",
        )
    )


if __name__ == "__main__":
    main()
