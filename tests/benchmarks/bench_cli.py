"""CLI latency, whole process: `dlfs --help`, `dlfs train --cfg job`, `dlfs runs` (targets: help <= 0.5 s,
`train --cfg job` <= 1.0 s; medians of ROUNDS runs, the commands alternating).

    python tests/benchmarks/bench_cli.py [ROUNDS]

`dlfs runs` lists a folder of 20 run folders made for it. Results: tests/benchmarks/results/cli.md.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from harness import alternate, dlfs, report, timed


def runs_folder(root: Path) -> Path:
    """20 finished runs as dlfs writes them (summary.json and .hydra/overrides.yaml), without training."""
    for i in range(20):
        run = root / "outputs" / "boston" / f"2026-01-01_00-00-{i:02d}_000000"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={0.001 * (i + 1)}\n")
        summary = {"status": "completed", "model": "boston", "metrics": {"test_loss": 20.0 + i, "test_mse": 20.0 + i}}
        (run / "summary.json").write_text(json.dumps(summary | {"epochs": 10, "epochs_completed": 10}))
    return root / "outputs"


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    with tempfile.TemporaryDirectory() as tmp:
        outputs = runs_folder(Path(tmp))
        commands = {
            "dlfs --help": dlfs("--help"),
            "dlfs train --cfg job": dlfs("train", "--cfg", "job"),
            "dlfs runs (20 runs)": dlfs("runs", str(outputs)),
        }
        results = alternate({name: (lambda c=cmd: {"seconds": timed(c)[1]}) for name, cmd in commands.items()}, rounds)
    print(report("CLI latency, whole process", results, ["seconds"], "seconds", False, "cli.md"))


if __name__ == "__main__":
    main()
