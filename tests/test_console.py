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
