"""The acceptance check of exact resume, at five interruption moments (slow: `make test-slow`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import DIGITS_CNN
from tests.test_resume import interrupt_and_compare


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.2, 0.9, 1.7, 2.6, 3.8])
def test_sigint_then_resume_equals_straight(straight_digits: Path, tmp_path: Path, delay: float) -> None:
    interrupt_and_compare(straight_digits, DIGITS_CNN, tmp_path, delay)
