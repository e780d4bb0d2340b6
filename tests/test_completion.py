"""Tab completion: `dlfs completion bash` installed in a real bash and driven as bash drives it on Tab."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_dlfs

from dlfs_cli.cli import COMMANDS
from dlfs_cli.completion import candidates


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("dlfs ", list(COMMANDS)),
        ("dlfs tr", ["train"]),
        ("dlfs train mod", ["model.", "model="]),
        ("dlfs train model=", ["model=autoencoder", "model=boston", "model=lstm_charmodel", "model=mnist_cnn"]),
        ("dlfs train model=mnist_cnn optimizer.l", ["optimizer.lr="]),
        ("dlfs train -m seed=1,2 experiment=book_b", ["experiment=book_boston"]),
        ("dlfs reproduce qui", ["quick=", "quick_overrides."]),
        ("dlfs runs --so", ["--sort"]),
        ("dlfs diff --p", ["--plot"]),
        ("dlfs nope x", []),
    ],
)
def test_candidates_for_each_command(line: str, expected: list[str]) -> None:
    assert candidates(line, list(COMMANDS)) == expected


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash on this machine")
def test_bash_completes_dlfs_on_tab(tmp_path: Path) -> None:
    script = run_dlfs("completion", "bash", cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    tab = """
tab() {  # what bash sets before calling the function bound to dlfs, then what it would offer
    COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; read -ra COMP_WORDS <<< "$COMP_LINE"
    [[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
    COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _dlfs_completion; echo "$1 -> ${COMPREPLY[*]}"
}
tab "dlfs tr"
tab "dlfs train model="
"""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", script.stdout + tab], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "dlfs tr -> train",
        "dlfs train model= -> model=autoencoder model=boston model=lstm_charmodel model=mnist_cnn",
    ]


def test_hydras_own_query_and_bad_shells(run_here, tmp_path: Path) -> None:
    """A completion installed with `dlfs train -sc install=bash` asks `dlfs -sc query=bash`: answered."""
    out = run_here("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "dlfs gen"})
    assert out.returncode == 0 and out.stdout.split() == ["generate"]
    out = run_here("completion", "tcsh", cwd=tmp_path)
    assert out.returncode == 2 and "bash|zsh|fish" in out.stderr and len(out.stderr.strip().splitlines()) == 1
