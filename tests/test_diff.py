"""`dlfs diff RUN_A RUN_B`: run folders written by hand (no training), compared in this process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

CONFIG = {
    "model": {"name": "boston", "hidden_size": 13},
    "optimizer": {"name": "sgd", "lr": 0.01, "nesterov": False},
    "trainer": {"epochs": 3, "early_stopping": {"patience": None}},
    "seed": 0,
}
SUMMARY = {
    "status": "completed",
    "model": "boston",
    "epochs": 3,
    "seed": 0,
    "device": "cpu",
    "versions": {"python": "3.11.7", "torch": "2.4.0", "dlfs": "0.1.0", "git": "abc123"},
    "metrics": {"val_loss": 20.0, "test_loss": 40.0},
    "epochs_completed": 3,
    "duration_s": 1.5,
}
METRICS = "epoch,step,split,lr,loss,mse,elapsed_s\n" + "".join(
    f"{e},{9 * e},train,0.01,{300 / e},,0.1\n{e},{9 * e},val,0.01,{150 / e},{150 / e},0.1\n" for e in (1, 2, 3)
)


def make_run(path: Path, config: dict[str, Any] | None = None, **summary: Any) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config or CONFIG))
    (path / "summary.json").write_text(json.dumps(SUMMARY | summary))
    (path / "metrics.csv").write_text(METRICS + "3,27,test,0.01,40.0,40.0,0.2\n")
    return path


def rows(out: str) -> list[list[str]]:
    """The cells of each table row rich printed (its box-drawing borders split them)."""
    return [[c.strip() for c in line.strip("│ ").split("│")] for line in out.splitlines() if line.startswith("│")]


def test_the_config_keys_run_facts_and_metrics_that_differ(run_here, tmp_path: Path) -> None:
    make_run(tmp_path / "a")
    changed = CONFIG | {"optimizer": {"name": "sgd", "lr": 0.05, "nesterov": True}, "device": "cpu"}
    del changed["seed"]
    make_run(
        tmp_path / "b",
        changed,
        seed=1,
        epochs_completed=2,
        versions=SUMMARY["versions"] | {"git": None},
        metrics={"val_loss": 15.0, "test_loss": 40.0, "val_accuracy": 0.5},
    )
    out = run_here("diff", "a", "b", cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == ""
    table = rows(out.stdout)
    assert "config: 4 of 9 keys differ" in out.stdout
    assert ["optimizer.lr", "0.01", "0.05"] in table
    assert ["optimizer.nesterov", "false", "true"] in table  # as YAML spells it
    assert ["seed", "0", "-"] in table and ["device", "-", "cpu"] in table  # a key in one run only
    assert ["model.name", "boston", "boston"] not in table  # the same: not shown
    assert ["epochs", "3/3", "2/3"] in table and ["seed", "0", "1"] in table
    assert ["versions.git", "abc123", "-"] in table
    assert not any(r[0] in ("status", "device", "duration_s", "versions.torch") for r in table[4:])
    assert ["val_loss", "20", "15", "-5", "-25.0%"] in table
    assert ["test_loss", "40", "40", "+0", "+0.0%"] in table
    assert ["val_accuracy", "-", "0.5", "-", "-"] in table  # a metric of one run only


def test_identical_runs(run_here, tmp_path: Path) -> None:
    make_run(tmp_path / "a")
    make_run(tmp_path / "b")
    out = run_here("diff", "a", str(tmp_path / "b"), cwd=tmp_path)
    assert out.returncode == 0
    assert "config: identical (8 keys)" in out.stdout
    assert "run: same status, epochs, seed, device, duration and versions" in out.stdout
    assert ["val_loss", "20", "20", "+0", "+0.0%"] in rows(out.stdout)


def test_plot_writes_a_png_of_both_runs(run_here, tmp_path: Path) -> None:
    make_run(tmp_path / "a")
    make_run(tmp_path / "b", metrics={"val_loss": 1.0})
    out = run_here("diff", "a", "b", "--plot", "both.png", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    png = (tmp_path / "both.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert "plot: both.png" in out.stdout


def _broken_json(tmp_path: Path) -> None:
    (make_run(tmp_path / "b") / "summary.json").write_text("{not json")


def _no_summary(tmp_path: Path) -> None:
    (make_run(tmp_path / "b") / "summary.json").unlink()


def _no_config(tmp_path: Path) -> None:
    (make_run(tmp_path / "b") / "config.yaml").unlink()


def _a_list_for_config(tmp_path: Path) -> None:
    (make_run(tmp_path / "b") / "config.yaml").write_text("- 1\n")


def _a_file(tmp_path: Path) -> None:
    (tmp_path / "b").write_text("")


def _hydra_file(name: str, text: bytes) -> Any:
    """A run the CLI started (its .hydra/ folder), with `text` in .hydra/`name`."""

    def setup(tmp_path: Path) -> None:
        (make_run(tmp_path / "b") / ".hydra").mkdir()
        (tmp_path / "b" / ".hydra" / "overrides.yaml").write_text("- model=boston\n")
        (tmp_path / "b" / ".hydra" / name).write_bytes(text)

    return setup


def _config(text: bytes) -> Any:
    def setup(tmp_path: Path) -> None:
        (make_run(tmp_path / "b") / "config.yaml").write_bytes(text)

    return setup


def _bad_metrics_for_plot(tmp_path: Path) -> None:
    (make_run(tmp_path / "b") / "metrics.csv").write_text("epoch,step,split,loss\n1,x,train,2\n")


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["a", "b"], "b: no such folder"),
        (_a_file, ["a", "b"], "b: not a folder"),
        (_no_summary, ["a", "b"], "b: not a run folder (no summary.json)"),
        (_no_config, ["a", "b"], "b: not a run folder (no config.yaml)"),
        (_broken_json, ["a", "b"], "b: unreadable summary.json: Expecting property name"),
        (_a_list_for_config, ["a", "b"], "b/config.yaml: not a config (a YAML list, not a mapping)"),
        (_config(b"\xff\xfe\n"), ["a", "b"], "b/config.yaml: unreadable: not UTF-8 text"),
        (_config(b": : :\n"), ["a", "b"], "b/config.yaml: unreadable: not YAML: expected <block end>"),
        (_config(b""), ["a", "b"], "b/config.yaml: not a config (an empty file, not a mapping)"),
        (_hydra_file("overrides.yaml", b"\xff\xfe\n"), ["a", "b"], "b: unreadable .hydra/overrides.yaml: not UTF-8"),
        (_hydra_file("overrides.yaml", b": : :\n"), ["a", "b"], "b: unreadable .hydra/overrides.yaml: not YAML"),
        (_hydra_file("overrides.yaml", b"- 1\n"), ["b", "a"], "b: unreadable .hydra/overrides.yaml: item 1 is"),
        (_hydra_file("overrides.yaml", b"a: 1\n"), ["a", "b"], ".hydra/overrides.yaml: a YAML dict, not a list"),
        (_hydra_file("hydra.yaml", b"\xff\n"), ["a", "b"], "b: unreadable .hydra/hydra.yaml: not UTF-8 text"),
        (None, ["a", "a", "--plot", "nowhere/x.png"], "--plot nowhere/x.png: no such folder nowhere"),
        (None, ["a", "a", "--plot", "x.jpg"], "--plot x.jpg: the file must end in .png"),
        (None, ["a", "a", "--plot", "a.png"], "--plot a.png: is a folder"),
        (_bad_metrics_for_plot, ["a", "b", "--plot", "x.png"], "b/metrics.csv: unreadable: invalid literal"),
        (None, ["a"], "dlfs diff: the following arguments are required: RUN_B"),
        (None, ["a", "a", "--sort", "x"], "dlfs diff: unrecognized arguments: --sort x"),
    ],
)
def test_errors_are_one_line_with_exit_2(run_here, tmp_path: Path, setup, args: list[str], message: str) -> None:
    make_run(tmp_path / "a")
    (tmp_path / "a.png").mkdir()
    if setup is not None:
        setup(tmp_path)
    out = run_here("diff", *args, cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("dlfs: error: "), out.stderr
    assert message in out.stderr
    assert not (tmp_path / "x.png").exists()


def test_diff_and_plot_do_not_import_torch(tmp_path: Path) -> None:
    make_run(tmp_path / "a")
    make_run(tmp_path / "b")
    script = """
import sys
from dlfs_cli.cli import main
try:
    main(["diff", "a", "b", "--plot", "p.png"])
except SystemExit as ex:
    assert not ex.code, ex.code
print("HEAVY", sorted(m for m in ("torch", "torchvision", "sklearn") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout and (tmp_path / "p.png").is_file()
