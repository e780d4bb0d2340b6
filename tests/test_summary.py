"""summary.json's one definition (dlfs_cli/summary.py): written as set, read tolerantly, typos refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlfs_cli.summary import FIELDS, Summary
from dlfs_cli.tracking import RunFolder


def test_a_summary_is_written_in_the_order_its_fields_were_set(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    Summary().update(status="failed", error="boom", model="boston", data="boston").save(path)
    assert (
        path.read_text()
        == json.dumps({"status": "failed", "error": "boom", "model": "boston", "data": "boston"}, indent=2) + "\n"
    )


def test_reading_and_writing_back_keeps_every_key_and_its_order(tmp_path: Path) -> None:
    """Keys of another dlfs version (or a user's) stay where they were; dropped fields go."""
    text = {"status": "completed", "from_the_future": [1, 2], "metrics": {"test_loss": 3}, "step": 7}
    text |= {"error": "old", "duration_s": 1.5}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(text))
    summary = Summary.load(path)
    assert summary.metrics == {"test_loss": 3} and summary.step == 7 and summary.duration_s == 1.5
    summary.drop("error")
    summary.update(status="running", epochs=3)
    summary.save(path)
    back = json.loads(path.read_text())
    assert list(back) == ["status", "from_the_future", "metrics", "step", "duration_s", "epochs"]
    assert back["status"] == "running" and back["from_the_future"] == [1, 2]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ([1, 2, 3], "a JSON list, not an object"),
        ({"status": 3}, "status is 3, not str | None"),
        ({"metrics": {"test_loss": "low"}}, "metrics is"),
        ({"epochs_completed": True}, "epochs_completed is true"),
        ({"figures": "loss.png"}, "figures is"),
    ],
)
def test_a_summary_of_the_wrong_shape_is_a_value_error_that_says_why(content: object, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Summary.from_dict(content)


def test_a_field_that_summary_json_does_not_have_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="no field 'epoch_completed'"):
        Summary().update(epoch_completed=1)
    run = RunFolder(tmp_path)
    with pytest.raises(TypeError, match="no field 'stauts'"):
        run.update_summary(stauts="completed")
    assert not (tmp_path / "summary.json").exists()
    run.update_summary(status="completed", epochs_completed=2)
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "completed", "epochs_completed": 2}
    assert run.summary.status == "completed" and "unknown" not in FIELDS
