"""The acceptance check of exact resume, at five interruption moments (slow: `make test-slow`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DIGITS_CNN
from test_resume import interrupt_and_compare


@pytest.mark.slow
# DIGITS_CNN trains 8 epochs of 41 steps (328: the validation split took a tenth of the images), so 330
# was never reached and that case only ever skipped; 300 is in the last epoch
@pytest.mark.parametrize("after_step", [5, 60, 133, 217, 300])
def test_sigint_then_resume_equals_straight(straight_digits: Path, tmp_path: Path, after_step: int) -> None:
    interrupt_and_compare(straight_digits, DIGITS_CNN, tmp_path, after_step)
