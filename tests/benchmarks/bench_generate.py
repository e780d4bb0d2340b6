"""`dlfs generate`'s sampling, one character per model call, on an idle and on a busy machine (issue 25:
sampling runs on one CPU thread).

    python tests/benchmarks/bench_generate.py [ROUNDS]

A run of the book's LSTM (hidden_size 256, a few batches of training: the speed does not depend on the
weights) samples 2,000 characters in a fresh process, as `dlfs generate` does (dlfs_cli.generate.sample,
one thread), and with torch's default threads (one per core: dlfs before issue 25). "Busy": every core
also runs a spinning process meanwhile, as on a machine that trains something else. Results:
tests/benchmarks/results/generate.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import ROOT, alternate, dlfs, report, timed

LENGTH = 2000

MEASURE = """
import json, sys, time
from contextlib import nullcontext
from pathlib import Path
import torch
from dlfs_cli import generate
run, threads = Path(sys.argv[1]), sys.argv[2]
if threads == "default":  # sampling as before issue 25: the process's threads, one per core
    generate.one_thread = lambda device: nullcontext()
model, vocab = generate.load_char_model(run, "last", torch.device("cpu"))
generate.sample(model, vocab, "The ", 50, 1.0, 0, torch.device("cpu"))  # warm up
t0 = time.perf_counter()
generate.sample(model, vocab, "The ", int(sys.argv[3]), 1.0, 0, torch.device("cpu"))
print(json.dumps({"ms_per_char": (time.perf_counter() - t0) * 1000 / int(sys.argv[3])}))
"""


def measure(run: Path, threads: str, busy: bool) -> dict[str, float]:
    spinners = (
        [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(len(os.sched_getaffinity(0)))]
        if busy
        else []
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, str(run), threads, str(LENGTH)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        ).stdout  # fmt: skip
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    return json.loads(out.splitlines()[-1])


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        timed(dlfs("train", "model=lstm_charmodel", "trainer.limit_batches=5", "device=cpu", f"hydra.run.dir={run}"))
        sides = {
            f"{'busy' if busy else 'idle'}, {'one thread (dlfs)' if one else 'default threads'}": (
                lambda one=one, busy=busy: measure(run, "one" if one else "default", busy)
            )
            for busy in (False, True)
            for one in (True, False)
        }
        results = alternate(sides, rounds)
    print(
        report(
            "`dlfs generate`: sampling 2,000 characters", results, ["ms_per_char"], "ms_per_char", False, "generate.md"
        )
    )


if __name__ == "__main__":
    main()
