"""Stop signals in every phase of a run, and a console that goes away.

Each phase test makes the signal arrive inside that phase (the phase's own function raises it, so no
timing is involved), with the process's handlers installed as `dlfs` installs them; then it checks the
exit code (128 + the signal), the status, and that a resume finishes what was not done.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import start_long_run, wait_for

import dlfs_cli.figures
import dlfs_cli.generate
import dlfs_cli.sweep
import dlfs_cli.train
import dlfs_cli.trainer
from dlfs_cli import lifecycle
from dlfs_cli.trainer import Trainer

QUICK = ["device=cpu", "trainer.epochs=2", "trainer.limit_batches=3"]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture
def process_handlers(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], None]]:
    """The stop handlers installed for the whole command, as `dlfs` does; yields a reset for the next
    command (a new process would start without the request). pytest's own handlers come back after."""
    previous = {s: signal.getsignal(s) for s in lifecycle.STOP_SIGNALS}
    monkeypatch.undo()  # the dlfs fixture's no-op install: here the real one

    def reset() -> None:
        lifecycle._forget()

    yield reset
    for s, handler in previous.items():
        signal.signal(s, handler)
    lifecycle._installed = False
    reset()


def raising(signum: int, original: Callable, when: Callable[..., bool] = lambda *a, **k: True) -> Callable:
    """`original`, with `signum` delivered to this process first (once, when `when(...)`)."""
    sent = []

    def wrapper(*args, **kwargs):
        if not sent and when(*args, **kwargs):
            sent.append(signum)
            signal.raise_signal(signum)  # the handler has run when this returns
        return original(*args, **kwargs)

    return wrapper


def run_interrupted_then_resumed(dlfs, reset, run: Path, args: list[str], code: int, phase: str) -> dict:
    result = dlfs("train", *args, f"hydra.run.dir={run}")
    assert result.code == code, result.err
    assert f"interrupted by {signal.Signals(code - 128).name}" in result.err and "Traceback" not in result.err
    assert phase in result.err and f"Resume with: dlfs train resume={run}" in result.err
    interrupted = summary(run)
    assert interrupted["status"] == "interrupted"
    reset()
    return interrupted


def resume(dlfs, run: Path) -> dict:
    result = dlfs("train", f"resume={run}")
    assert result.code == 0, result.err
    done = summary(run)
    assert done["status"] == "completed"
    return done


def test_a_signal_during_set_up(dlfs, process_handlers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dlfs_cli.train, "build_data", raising(signal.SIGHUP, dlfs_cli.train.build_data))
    run = tmp_path / "run"
    run_interrupted_then_resumed(dlfs, process_handlers, run, QUICK, 129, "while the run was being set up")
    assert not (run / "checkpoints" / "last.pt").exists()  # nothing was trained
    monkeypatch.undo()
    done = resume(dlfs, run)  # from the beginning
    assert done["epochs_completed"] == 2 and (run / "figures" / "loss_curves.png").exists()


def at_step_4(trainer: Trainer, *args) -> bool:
    return trainer.step == 4


def test_a_signal_during_training(dlfs, process_handlers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Trainer, "_after_step", raising(signal.SIGINT, Trainer._after_step, at_step_4))
    run = tmp_path / "run"
    run_interrupted_then_resumed(dlfs, process_handlers, run, QUICK, 130, "in epoch 2 after batch 1 (step 4)")
    monkeypatch.undo()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert resume(dlfs, run)["epochs_completed"] == 2


def test_a_signal_during_the_final_evaluation(
    dlfs, process_handlers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*QUICK, "trainer.eval_every=5"]  # the one evaluation is the final one
    monkeypatch.setattr(dlfs_cli.trainer, "evaluate", raising(signal.SIGTERM, dlfs_cli.trainer.evaluate))
    run = tmp_path / "run"
    before = run_interrupted_then_resumed(dlfs, process_handlers, run, args, 143, "after the last step")
    assert before["metrics"] and not (run / "figures").exists()  # measured and saved; the figures not made
    monkeypatch.undo()
    done = resume(dlfs, run)
    assert done["metrics"] == before["metrics"] and (run / "figures" / "loss_curves.png").exists()


def test_a_signal_while_the_figures_are_drawn(
    dlfs, process_handlers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dlfs_cli.figures, "make_figures", raising(signal.SIGTERM, dlfs_cli.figures.make_figures))
    run = tmp_path / "run"
    run_interrupted_then_resumed(dlfs, process_handlers, run, QUICK, 143, "while the figures were drawn")
    monkeypatch.undo()
    (run / "figures" / "loss_curves.png").unlink()  # as if the signal had come before it was written
    assert resume(dlfs, run)["figures"] == ["figures/loss_curves.png"]
    assert (run / "figures" / "loss_curves.png").exists()


def test_a_signal_during_one_figure_stops_before_the_next(
    dlfs, process_handlers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The autoencoder draws four figures; a signal during the first (the loss curves) is honoured before the
    second: a long figure phase (a t-SNE map, many images) no longer runs to its end after a stop."""
    monkeypatch.setattr(dlfs_cli.figures, "loss_curves", raising(signal.SIGTERM, dlfs_cli.figures.loss_curves))
    run = tmp_path / "run"
    args = [*QUICK, "model=autoencoder", "data=digits", "figures.tsne_points=50"]
    run_interrupted_then_resumed(dlfs, process_handlers, run, args, 143, "while the figures were drawn")
    assert sorted(p.name for p in (run / "figures").iterdir()) == ["loss_curves.png"]


def test_a_signal_while_the_sample_is_made(
    dlfs, process_handlers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*QUICK, "model=lstm_charmodel", "model.hidden_size=8", "data.sequence_length=5", "figures.enabled=false"]
    monkeypatch.setattr(dlfs_cli.generate, "sample", raising(signal.SIGHUP, dlfs_cli.generate.sample))
    run = tmp_path / "run"
    run_interrupted_then_resumed(dlfs, process_handlers, run, args, 129, "while the text sample was made")
    monkeypatch.undo()
    (run / "samples.txt").unlink()
    resume(dlfs, run)
    assert len((run / "samples.txt").read_text()) > 100


def test_a_signal_while_the_sweep_is_summarised(
    dlfs, process_handlers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dlfs_cli.sweep, "summarize", raising(signal.SIGINT, dlfs_cli.sweep.summarize))
    result = dlfs("train", "-m", "seed=1,2", *QUICK, "figures.enabled=false", f"hydra.sweep.dir={tmp_path / 's'}")
    assert result.code == 130 and "Traceback" not in result.err, result.err
    rows = (tmp_path / "s" / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",completed," in row for row in rows[1:])  # the summary was finished


def test_sighup_from_a_closed_terminal_saves_and_says_interrupted(tmp_path: Path) -> None:
    """A real process: SIGHUP after its first epoch (waited for in metrics.csv, not by a clock)."""
    run = tmp_path / "run"
    proc = start_long_run(run, tmp_path)
    wait_for(lambda: (run / "metrics.csv").exists() and (run / "metrics.csv").read_text().count("\n") >= 3, proc)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 129 and "interrupted by SIGHUP" in err and "Traceback" not in err, err
    assert summary(run)["status"] == "interrupted" and (run / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2])
def test_a_schedulers_warning_signal_saves_and_says_interrupted(signum: int, tmp_path: Path) -> None:
    """SIGUSR1 and SIGUSR2 are what SLURM's --signal and submitit send before a time limit: by default they
    killed the run at once, leaving no last.pt of the moment and its status `running`. A real process."""
    run = tmp_path / "run"
    proc = start_long_run(run, tmp_path)
    wait_for(lambda: (run / "metrics.csv").exists() and (run / "metrics.csv").read_text().count("\n") >= 3, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum and f"interrupted by {name}" in err and "Traceback" not in err, err
    assert summary(run)["status"] == "interrupted" and (run / "checkpoints" / "last.pt").exists()


def test_a_closed_console_never_stops_a_sweep(tmp_path: Path) -> None:
    """dlfs train -m seed=1,2,3 trainer.epochs=2 | head -3: every job runs, summary.csv is written."""
    sweep = tmp_path / "s"
    args = " ".join([*QUICK, "figures.enabled=false", f"hydra.sweep.dir={sweep}"])
    cmd = f"{sys.executable} -m dlfs_cli train -m seed=1,2,3 {args} | head -3"
    out = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 3 and "Traceback" not in out.stderr and "Logging error" not in out.stderr
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 4 and all(",completed," in row for row in rows[1:])
    assert all(summary(sweep / str(job))["status"] == "completed" for job in range(3))


def test_an_ignored_signal_stays_ignored(process_handlers) -> None:
    """nohup ignores SIGHUP, a shell's background job SIGINT: dlfs leaves them ignored."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    lifecycle.install_for_process()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is lifecycle._handle


def test_a_second_signal_while_the_stop_is_recorded_leaves_the_run_interrupted(
    dlfs, process_handlers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second signal lands while the first one's stop is being written down: it aborts once that is
    done (it left status "failed" when it cut the record short)."""
    monkeypatch.setattr(Trainer, "_after_step", raising(signal.SIGINT, Trainer._after_step, at_step_4))
    record = dlfs_cli.train._record_failure
    monkeypatch.setattr(dlfs_cli.train, "_record_failure", raising(signal.SIGTERM, record))
    run = tmp_path / "run"
    result = dlfs("train", *QUICK, f"hydra.run.dir={run}")
    assert result.code == 143 and "aborted" in result.err and "Traceback" not in result.err, result.err
    assert summary(run)["status"] == "interrupted" and "interrupted by SIGINT" in summary(run)["error"]


EXIT_LATE = """
import atexit, signal, sys
from dlfs_cli.cli import main
atexit.register(lambda: [signal.raise_signal(signal.SIGTERM) for _ in range({n})])
sys.argv = ["dlfs", "train", "--cfg", "job"]
main()
"""


@pytest.mark.parametrize("signals", [1, 2])
def test_a_signal_as_the_process_exits_still_gets_its_code_and_line(signals: int, tmp_path: Path) -> None:
    """After the command's own last check, while the process ends (atexit handlers): exit 143 and the
    line, never 0 (a shell script would go on after a Ctrl-C) nor a traceback, for one signal or two."""
    code = EXIT_LATE.format(n=signals)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 143, out.stderr
    assert out.stderr.strip() == "dlfs: stopped by a signal (exit 143); everything was saved", out.stderr
    assert "model:" in out.stdout  # the command's own output is all there


def test_a_sweeps_worker_stops_when_the_sweep_does(process_handlers, tmp_path: Path) -> None:
    """A signal sent to the sweep's process alone (kill PID, a scheduler's timeout) reaches its joblib
    workers through the stop file; the worker stops as that signal would, and a real signal arriving
    after it (Ctrl-C reaches the whole group) is the same stop, not a second one."""
    lifecycle.install_for_process()
    stop = tmp_path / dlfs_cli.sweep.STOP_FILE
    asked: list[int] = []
    lifecycle.on_request(asked.append)
    with dlfs_cli.sweep.relay_stop(stop):
        stop.write_text(str(int(signal.SIGTERM)))
        wait_for(lambda: lifecycle.requested() is not None, timeout=30)
        signal.raise_signal(signal.SIGINT)  # no Aborted: the first signal this process received
    assert asked == [signal.SIGTERM] and lifecycle.exit_code() == 143
    with pytest.raises(lifecycle.Aborted):
        signal.raise_signal(signal.SIGHUP)


def test_a_process_started_without_stderr_gives_its_children_one(tmp_path: Path) -> None:
    """`dlfs train -m ... hydra/launcher=joblib 2>&-`: the workers died at their start (faulthandler needs
    a stderr) and the sweep ran no job. The closed descriptor is /dev/null from the start, inherited."""
    code = (
        "import subprocess, sys; from dlfs_cli import lifecycle; lifecycle.protect_console()\n"
        "child = 'import sys; print(sys.stderr is not None)'\n"
        "print(subprocess.run([sys.executable, '-c', child], stdout=subprocess.PIPE, text=True).stdout.strip())"
    )
    out = subprocess.run(
        ["bash", "-c", f'{sys.executable} -c "$0" 2>&-', code], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.stdout.strip() == "True", (out.stdout, out.stderr)


def test_joblibs_resource_tracker_outlives_a_closed_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """loky's tracker ignores SIGINT and SIGTERM only: SIGHUP to the terminal's group (or SIGUSR1/2 from a
    scheduler) killed it and the workers printed its tracebacks. dlfs starts it with those ignored."""
    from joblib.externals.loky.backend import resource_tracker

    tracker = resource_tracker.ResourceTracker()  # a tracker of this test's own: the module's may be running
    monkeypatch.setattr(resource_tracker, "ensure_running", tracker.ensure_running)
    dlfs_cli.sweep._start_loky_tracker()
    try:
        ignored = int(Path(f"/proc/{tracker._pid}/status").read_text().split("SigIgn:")[1].split()[0], 16)
        for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):  # a scheduler's warnings too
            assert ignored & (1 << (signum - 1)), signal.Signals(signum).name
            assert signal.getsignal(signum) is not signal.SIG_IGN  # this process's own is put back
    finally:
        tracker._stop()


@pytest.mark.slow  # joblib's worker processes each import torch (~8 s)
def test_a_signal_to_a_joblib_sweeps_process_alone_stops_its_running_jobs(tmp_path: Path) -> None:
    """`kill PID` (a scheduler's timeout) reaches the sweep's process, not the workers that train: they stop
    and save as that signal would, instead of training to the end."""
    sweep = tmp_path / "s"
    args = ["train", "-m", "seed=1,2", "device=cpu", "trainer.epochs=100000", "figures.enabled=false"]
    args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlfs_cli", *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group: the signal reaches the sweep's process alone
    )
    try:
        wait_for(lambda: all((sweep / str(j) / "checkpoints" / "last.pt").exists() for j in (0, 1)), proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("dlfs: sweep interrupted: 2 of the sweep's jobs did not complete")
    assert [summary(sweep / str(j))["status"] for j in (0, 1)] == ["interrupted", "interrupted"]
    assert (sweep / "summary.csv").exists()
