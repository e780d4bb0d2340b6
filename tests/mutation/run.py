"""`make mutate`: mutation testing of the modules that keep the README's promises, with cosmic-ray.

    python tests/mutation/run.py [MODULE ...]      # default: every module of MODULES

Why cosmic-ray: it mutates the source file on disk and runs an ordinary test command against it, so the
tests that start real `dlfs` processes (signals, locks, torchrun, joblib) run the mutant too. mutmut 3 runs
its mutants through trampolines selected inside the pytest process, which a child process does not see.

Each module is mutated in a clone of the repository's HEAD in a temporary folder (never this working tree:
a mutant left on disk by a killed run would be committed), with PYTHONPATH pointing there so that the
tests, and every process they start, import the mutated copy. The tests run with this project's Python
(.venv); cosmic-ray itself lives in .venv-mutate (its SQLAlchemy 2 would clash with the optuna extra's
SQLAlchemy < 2). Results: tests/mutation/results.md (a row per module, appended per run) and
tests/mutation/survivors/<module>.txt (each surviving mutant's diff, to kill with a sharper test or to list
in tests/mutation/EQUIVALENT.md with the reason).
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
COSMIC_RAY = ROOT / ".venv-mutate" / "bin" / "cosmic-ray"
PYTHON = ROOT / ".venv" / "bin" / "python"
TIMEOUT_S = 180  # one mutant's test command; a mutant that loops forever is killed (counted as a timeout)

# module -> the tests that keep its promises (pytest's -x: the first failure kills the mutant)
MODULES = {
    "dlfs_cli/resume.py": ["tests/test_resume.py"],
    "dlfs_cli/checkpoint.py": ["tests/test_resume.py", "tests/test_train.py"],
    "dlfs_cli/runlock.py": ["tests/test_lock.py"],
    "dlfs_cli/lifecycle.py": ["tests/test_signals.py"],
    "dlfs_cli/sweep.py": ["tests/test_sweep.py", "tests/test_optuna.py"],
    "dlfs_cli/sweep_resume.py": ["tests/test_sweep_resume.py"],
    "dlfs_cli/trainer.py": ["tests/test_train.py", "tests/test_resume.py"],
    "dlfs_cli/errors.py": ["tests/test_cli.py", "tests/test_system.py"],  # exit codes, one-line OS errors
}

CONFIG = """[cosmic-ray]
module-path = "{module}"
timeout = {timeout}
excluded-modules = []
test-command = "env PYTHONPATH={clone} {python} -m pytest -x -q -p no:cacheprovider {tests}"

[cosmic-ray.distributor]
name = "local"
"""


def mutate(module: str, tests: list[str]) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        config = clone / "cosmic-ray.toml"
        config.write_text(
            CONFIG.format(module=module, timeout=TIMEOUT_S, clone=clone, python=PYTHON, tests=" ".join(tests))
        )
        session = clone / "session.sqlite"
        subprocess.run([str(COSMIC_RAY), "init", str(config), str(session)], check=True, cwd=clone)
        subprocess.run([str(COSMIC_RAY), "exec", str(config), str(session)], check=True, cwd=clone)
        with sqlite3.connect(session) as db:
            rows = db.execute("select worker_outcome, test_outcome, output, diff from work_results").fetchall()
            total = db.execute("select count(*) from work_items").fetchone()[0]
    counts = {"mutants": total, "killed": 0, "survived": 0, "timeout": 0, "incompetent": 0}
    survivors = []
    for worker, test, output, diff in rows:
        if worker != "NORMAL" or test not in ("KILLED", "SURVIVED"):
            counts["incompetent"] += 1  # the mutant or its worker broke before a test could judge it
        elif test == "KILLED" and output == "timeout":
            counts["timeout"] += 1  # a mutant that never ends: the tests do not pass it, so it is killed
        elif test == "KILLED":
            counts["killed"] += 1
        else:
            counts["survived"] += 1
            survivors.append(diff)
    (HERE / "survivors").mkdir(exist_ok=True)
    (HERE / "survivors" / f"{Path(module).stem}.txt").write_text("\n".join(survivors))
    return counts


def main() -> None:
    if not COSMIC_RAY.exists():
        sys.exit(f"{COSMIC_RAY} is missing: run `make mutate` (it installs cosmic-ray there)")
    chosen = sys.argv[1:] or list(MODULES)
    results = HERE / "results.md"
    if not results.exists():
        results.write_text(
            "# Mutation testing (cosmic-ray), `make mutate`\n\n"
            "| date | commit | module | tests | mutants | killed | timeout | survived | incompetent | score | hours |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n"
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    for module in chosen:
        tests = MODULES[module]
        start = time.time()
        c = mutate(module, tests)
        competent = c["killed"] + c["timeout"] + c["survived"]
        score = (c["killed"] + c["timeout"]) / competent if competent else float("nan")
        row = (
            f"| {time.strftime('%Y-%m-%d %H:%M')} | {commit.stdout.strip()} | `{module}` | {', '.join(tests)} | "
            f"{c['mutants']} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['incompetent']} | "
            f"{score:.1%} | {(time.time() - start) / 3600:.2f} |"
        )
        with open(results, "a") as f:
            f.write(row + "\n")
        print(row, flush=True)
    shutil.rmtree(HERE / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
