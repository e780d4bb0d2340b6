"""One writer per run folder (runlock.py), and the file systems that refuse to be written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import start_long_run, wait_for

from dlfs_cli import runlock


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A run that trains for as long as the test needs it (another process, holding the run's lock)."""
    run = tmp_path / "run"
    proc = start_long_run(run, tmp_path)
    # its first checkpoint: a resume has something to continue from once it is killed
    wait_for(lambda: (run / "checkpoints" / "last.pt").exists(), proc)
    yield proc, run
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_a_running_run_has_one_writer_until_it_is_killed(
    running, dlfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, run = running
    monkeypatch.chdir(tmp_path)
    resumed = dlfs("train", f"resume={run}")
    assert resumed.code == 2 and "Traceback" not in resumed.err
    assert f"resume={run}: the run is still being written by another dlfs process (PID {proc.pid} on" in resumed.err
    second = dlfs("train", "device=cpu", f"hydra.run.dir={run}", "seed=3")  # a new run into its folder
    assert second.code == 2 and f"is being written by another dlfs process (PID {proc.pid}" in second.err
    assert "'dlfs train device=cpu trainer.epochs=100000" in second.err  # the holder's command, and since when
    assert proc.poll() is None  # the first run goes on, alone: every metrics.csv row is whole
    rows = (run / "metrics.csv").read_text().splitlines()
    assert all(row.count(",") == rows[0].count(",") for row in rows)
    listed = dlfs("runs", str(tmp_path))
    assert listed.code == 0 and "running" in listed.out
    evaluated = dlfs("eval", f"run={run}")
    assert f"is still being written (PID {proc.pid}" in evaluated.err

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert summary(run)["status"] == "running"  # nothing could write more
    assert "killed" in dlfs("runs", str(tmp_path)).out
    done = summary(run)["epochs_completed"]
    resumed = dlfs("train", f"resume={run}", f"trainer.epochs={done + 1}")  # at once: the kernel dropped the lock
    assert resumed.code == 0, resumed.err
    assert summary(run)["status"] == "completed" and summary(run)["epochs_completed"] == done + 1


def test_the_lock_is_the_processes_own(tmp_path: Path) -> None:
    runlock.acquire(tmp_path)
    runlock.acquire(tmp_path)  # again: a no-op
    assert runlock.holds(tmp_path)
    code = (
        "import sys; from pathlib import Path; from dlfs_cli import runlock\n"
        "try:\n    runlock.acquire(Path(sys.argv[1]))\nexcept runlock.Busy as ex:\n    print(ex)\n"
    )
    refused = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert f"PID {os.getpid()}" in refused.stdout
    runlock.release(tmp_path)
    assert runlock.holder(tmp_path) is None
    taken = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert taken.stdout == "" and taken.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A file system of 160 KiB (tmpfs; another size with indirect parametrization); skipped where this user
    may not mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    size = getattr(request, "param", "160k")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()[:100]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(
    small_disk: Path, dlfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = small_disk / "run"
    monkeypatch.chdir(small_disk)
    # 120 KiB taken: the run's first files fit, its checkpoints soon do not
    (small_disk / "ballast").write_bytes(b"\0" * 120 * 1024)
    result = dlfs("train", "device=cpu", "trainer.epochs=200", "model.hidden_size=64", f"hydra.run.dir={run}")
    assert result.code == 2 and "Traceback" not in result.err
    line = result.err.strip().splitlines()[-1]
    assert line.startswith("dlfs: error: could not write ") and str(run) in line and "the disk is full" in line, line
    assert summary(run)["status"] == "failed" or "summary.json" in line  # said where it could still be said
    assert not list(run.rglob(".*.tmp"))  # no half-written temporary file left
    if (run / "checkpoints" / "last.pt").exists():
        import torch

        torch.load(run / "checkpoints" / "last.pt", weights_only=True)  # the previous one is whole


@pytest.mark.parametrize("small_disk", ["8k"], indirect=True)
def test_a_disk_full_before_the_run_began_names_the_folder(small_disk: Path, dlfs, monkeypatch) -> None:
    """Full already when Hydra writes its own files (.hydra/config.yaml), whose error names no file."""
    monkeypatch.chdir(small_disk)
    result = dlfs("train", "device=cpu", "hydra.run.dir=run")
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err.strip() == f"dlfs: error: cannot use {small_disk / 'run'}/: the disk is full", result.err
    assert list(small_disk.iterdir()) == []  # and the refused run's folder went


def test_a_read_only_working_folder(small_disk: Path, dlfs, monkeypatch: pytest.MonkeyPatch) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    monkeypatch.chdir(small_disk)
    result = dlfs("train", "device=cpu")
    assert result.code == 2 and "Traceback" not in result.err
    assert "cannot create the output folder outputs" in result.err
    assert "the file system is read-only" in result.err


def test_a_refused_resume_leaves_a_starting_run_alone(tmp_path: Path, dlfs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that holds its folder but has no summary.json yet (still setting up): resume= is refused, and
    nothing of the folder is removed."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("{}\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"  # waits for the line, not for a clock
        monkeypatch.chdir(tmp_path)
        result = dlfs("train", f"resume={run}")
        assert result.code == 2 and f"still being written by another dlfs process (PID {holder.pid}" in result.err
        assert sorted(p.name for p in run.iterdir()) == [".dlfs.lock", ".hydra"]
    finally:
        holder.communicate("")  # its stdin closes: it exits and the kernel drops its lock


HOLD = (
    "import sys; from pathlib import Path; from dlfs_cli import runlock\n"
    "runlock.acquire(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()\n"
)


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    """DataLoader workers are forked: the lock must end with the writer, not with its last worker."""
    runlock.acquire(tmp_path)
    report_r, report_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: says whether it thinks it holds the lock, then lives until told to go
        os.close(hold_w)  # else its own copy would keep the pipe open
        os.write(report_w, b"1" if runlock.holds(tmp_path) else b"0")
        os.read(hold_r, 1)
        os._exit(0)
    try:
        assert os.read(report_r, 1) == b"0"
        runlock.release(tmp_path)  # the writer ends while its forked child still lives
        code = "import sys; from pathlib import Path; from dlfs_cli import runlock; runlock.acquire(Path(sys.argv[1]))"
        taken = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert taken.returncode == 0, taken.stderr[-500:]
    finally:
        os.close(hold_w)  # the child's read returns: it exits
        os.waitpid(pid, 0)
        for fd in (report_r, report_w, hold_r):
            os.close(fd)
