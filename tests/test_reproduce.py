"""`dlfs reproduce`: the machinery on tiny offline data (quick=true), and experiments that cannot run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_dlfs

BOOK = {"book_boston", "book_mnist_cnn", "book_lstm_charmodel", "book_autoencoder"}


@pytest.fixture(scope="module")  # the eight quick runs take ~20 s: the tests that read them are slow
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    cwd = tmp_path_factory.mktemp("reproduce")
    out = run_dlfs("reproduce", "quick=true", "hydra.run.dir=repro", cwd=cwd, timeout=300)
    return cwd / "repro", out


@pytest.mark.slow
def test_quick_reproduction_writes_the_report(quick) -> None:
    folder, out = quick
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((folder / "report.json").read_text())
    assert {e["name"] for e in report["experiments"]} == BOOK
    for e in report["experiments"]:
        assert {"name", "metric", "book", "ours", "tolerance", "pass", "run_dir", "duration_s"} <= e.keys()
        summary = json.loads((folder / e["run_dir"] / "summary.json").read_text())
        assert summary["status"] == "completed"  # each experiment is a full run folder
        assert e["ours"] == pytest.approx(summary["metrics"][e["metric"]])
        assert isinstance(e["pass"], bool) and e["duration_s"] >= 0
    assert {e["book_preset"] for e in report["improved"]} == BOOK
    assert report["quick"] is True and report["seeds"] == [0]


@pytest.mark.slow
def test_the_report_embeds_figures_and_the_generated_text(quick) -> None:
    folder, _ = quick
    text = (folder / "REPORT.md").read_text()
    assert "| experiment | metric | book | ours | tolerance | result | seeds | duration |" in text
    assert "## Beyond the book" in text and "improved_lstm_charmodel" in text
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert len(figures) >= 3 and all((folder / f).is_file() for f in figures)
    assert any(f.endswith("tsne.png") for f in figures) and any(f.endswith("reconstructions.png") for f in figures)
    assert "## Generated text (book_lstm_charmodel" in text
    assert "## Environment" in text and "torch" in text


def test_an_experiment_that_cannot_run_is_reported_and_the_rest_run(run_here, mnist_root: Path, tmp_path: Path) -> None:
    images = mnist_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    out = run_here(
        "reproduce", "only=[book_boston,book_mnist_cnn]", "improved=false", f"data.root={mnist_root}",
        "hydra.run.dir=repro", cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert out.returncode == 1 and "the reproduction did not hold" in out.stderr and "Traceback" not in out.stderr
    report = {e["name"]: e for e in json.loads((tmp_path / "repro" / "report.json").read_text())["experiments"]}
    assert report["book_boston"]["pass"] is True and report["book_boston"]["ours"] <= 20
    assert (
        report["book_mnist_cnn"]["status"].startswith("not run: ")
        and "is truncated" in report["book_mnist_cnn"]["status"]
    )
    assert report["book_mnist_cnn"]["pass"] is None
    assert "not run: " in (tmp_path / "repro" / "REPORT.md").read_text()


def test_reproduce_refuses_unknown_experiments(run_here, tmp_path: Path) -> None:
    out = run_here("reproduce", "only=[book_nope]", "hydra.run.dir=repro", cwd=tmp_path)
    assert out.returncode == 2 and "only: unknown experiment book_nope; valid: book_autoencoder" in out.stderr


@pytest.mark.slow
def test_dlfs_runs_lists_the_runs_inside_a_reproduction(quick, capsys) -> None:
    from dlfs_cli.runs import list_runs

    folder, _ = quick
    list_runs([str(folder.parent)])
    text = capsys.readouterr().out
    assert "8 run(s)" in text and "repro/book_boston/seed0" in text  # not the reproduction's folder itself


def test_a_metric_the_runs_lack_fails_its_row_and_a_report_is_not_overwritten(run_here, tmp_path: Path) -> None:
    args = ["reproduce", "quick=true", "only=[book_boston]", "improved=false", "hydra.run.dir=repro"]
    out = run_here(*args, "targets.0.metric=test_accuracy", cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    (entry,) = json.loads((tmp_path / "repro" / "report.json").read_text())["experiments"]
    assert entry["status"].startswith("failed: no test_accuracy in the runs' metrics")
    again = run_here(*args, cwd=tmp_path)
    assert again.returncode == 2 and "repro already holds a reproduction (report.json)" in again.stderr
