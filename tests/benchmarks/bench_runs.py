"""`dlfs runs` over 2,000 run folders, whole process (issue 25's target: <= 2 s on the project's machine).

    python tests/benchmarks/bench_runs.py [ROUNDS]

The folders are real: one 4-job sweep trained by `dlfs train -m` (Boston, one epoch, with its figures and
checkpoints), copied 500 times, so each of the 2,000 runs has the files dlfs and Hydra write (summary.json,
.hydra/overrides.yaml and hydra.yaml, ...). `dlfs --help` alternates with it: the process's own start.
Results: tests/benchmarks/results/runs.md.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from harness import alternate, dlfs, report, timed

SWEEP = ["seed=1,2,3,4", "trainer.epochs=1", "device=cpu"]
COPIES = 500


def outputs(root: Path) -> Path:
    sweep = root / "sweep"
    timed(dlfs("train", "-m", *SWEEP, f"hydra.sweep.dir={sweep}"))
    many = root / "outputs"
    for i in range(COPIES):
        shutil.copytree(sweep, many / f"sweep{i:03d}")
    return many


def listed(many: Path) -> dict[str, float]:
    out, wall = timed(dlfs("runs", str(many)))
    assert out.startswith(f"{4 * COPIES} run(s) under"), out[:200]
    return {"seconds": wall}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    with tempfile.TemporaryDirectory() as tmp:
        many = outputs(Path(tmp))
        sides = {
            "dlfs --help": lambda: {"seconds": timed(dlfs("--help"))[1]},
            "dlfs runs (2,000 runs)": lambda: listed(many),
        }
        results = alternate(sides, rounds)
    print(
        report("`dlfs runs` over 2,000 run folders, whole process", results, ["seconds"], "seconds", False, "runs.md")
    )


if __name__ == "__main__":
    main()
