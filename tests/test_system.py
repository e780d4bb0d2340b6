"""The systems dlfs runs on (system.py): on native Windows every command says so in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Windows as dlfs's imports see it, in a fresh Python: no fcntl, no fork, no SIGHUP, sys.platform win32.
# subprocess and shutil are imported first: they pick their Windows half (_winapi) at import, absent here.
FAKE_WINDOWS = """
import os, shutil, signal, subprocess, sys
sys.modules["fcntl"] = None  # `import fcntl` raises ImportError
del os.register_at_fork, os.fork, signal.SIGHUP
sys.platform = "win32"
"""
REFUSAL = "Windows is not supported: dlfs needs Linux (or macOS, untested) for its run locks and stop signals; run"


def on_windows(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", FAKE_WINDOWS + code], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("args", [["train"], ["train", "model=mnist_cnn"], ["runs"], ["reproduce", "--cfg", "job"]])
def test_every_command_on_windows_is_one_line(args: list[str], tmp_path: Path) -> None:
    """fcntl, os.register_at_fork and signal.SIGHUP were used at import: even `dlfs --help` was a traceback."""
    out = on_windows(f"sys.argv = ['dlfs', *{args!r}]\nfrom dlfs_cli.cli import main\nmain()", tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"dlfs: error: {REFUSAL}") and out.stderr.count("\n") == 1
    assert not any(tmp_path.iterdir())  # nothing written


def test_help_and_the_api_on_windows(tmp_path: Path) -> None:
    out = on_windows("sys.argv = ['dlfs', '--help']\nfrom dlfs_cli.cli import main\nmain()", tmp_path)
    assert out.returncode == 0 and "usage: dlfs <command>" in out.stdout and not out.stderr
    out = on_windows(
        "from dlfs_cli import api\ntry:\n    api.train()\nexcept Exception as ex:\n    print(ex)", tmp_path
    )
    assert out.stdout.startswith(REFUSAL) and not out.stderr
