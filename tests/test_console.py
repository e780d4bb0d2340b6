"""A calm console: progress bars that end at their totals, a line for the long phases."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from dlfs_cli import tracking


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    screen = io.StringIO()
    monkeypatch.setattr(tracking, "console", Console(file=screen, force_terminal=True, width=100))
    return screen


def test_the_bars_end_at_their_totals(terminal: io.StringIO) -> None:
    """The batch bar is refreshed at most every 0.25 s: at an epoch's end it is set to its total, so a run
    never ends showing 6/10 batches."""
    with tracking.ProgressDisplay(2, 10) as progress:
        progress.batch(6)
        progress.epoch(1, 1.0, None)
        progress.batch(3)
        progress.epoch(2, 0.5, None)
        assert progress._progress is not None
        epochs, batches = progress._progress.tasks
    assert (epochs.completed, batches.completed) == (2, 10)


def test_a_long_phase_says_what_it_does(terminal: io.StringIO, caplog: pytest.LogCaptureFixture) -> None:
    with tracking.phase("drawing the figures"):
        pass  # a spinner on a terminal, nothing logged
    assert "drawing the figures" not in caplog.text
    plain = Console(file=io.StringIO(), force_terminal=False)
    with pytest.MonkeyPatch.context() as m, caplog.at_level(logging.INFO, logger="dlfs"):
        m.setattr(tracking, "console", plain)
        with tracking.phase("drawing the figures"):
            pass
    assert "drawing the figures ..." in caplog.text  # a file or a pipe gets a line


def test_an_evaluation_is_named_on_the_bar(terminal: io.StringIO, make_cfg, tmp_path, monkeypatch) -> None:
    """While the held-out splits are evaluated the batch bar says so, then shows batches again."""
    from conftest import SMOKE

    from dlfs_cli import trainer
    from dlfs_cli.train import train

    bars: list[tracking.ProgressDisplay] = []
    enter = tracking.ProgressDisplay.__enter__

    def remember(self: tracking.ProgressDisplay) -> tracking.ProgressDisplay:
        bars.append(self)
        return enter(self)

    seen: list[str] = []
    evaluate = trainer.evaluate

    def spy(*args, **kwargs):
        assert bars[-1]._progress is not None
        seen.append(bars[-1]._progress.tasks[1].description)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(tracking.ProgressDisplay, "__enter__", remember)
    monkeypatch.setattr(trainer, "evaluate", spy)
    train(make_cfg(*SMOKE, "figures.enabled=false"), tmp_path / "run")
    assert seen == ["evaluating"] * 3  # val after epochs 1 and 2, test after the last
    assert bars[-1]._progress is not None and bars[-1]._progress.tasks[1].description == "batches"
