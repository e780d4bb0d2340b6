"""`dlfs runs`: a readable table for any mix of runs, --columns/--all, csv and json, --limit, --sort.

The run folders are written by hand (summary.json, and .hydra/overrides.yaml for the runs the CLI
started): no training, no torch.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import SMOKE

from dlfs_cli import runs as runs_module
from dlfs_cli.runs import TABLE_WIDTH, shorten


def regression(val: float | None, test: float) -> dict[str, float]:
    out = {f"val_{k}": v for k, v in (("loss", val), ("mse", val), ("rmse", val), ("mae", val)) if val is not None}
    return out | {"test_loss": test, "test_mse": test, "test_rmse": math.sqrt(test), "test_mae": test / 2}


MNIST = {"val_loss": 0.0871, "val_accuracy": 0.9734, "test_loss": 0.0912, "test_accuracy": 0.9712}
LSTM = {"val_loss": 2.3101, "val_bpc": 3.3328, "val_accuracy": 0.3512, "test_loss": 2.3062, "test_bpc": 3.3271}
LSTM |= {"test_accuracy": 0.3544}
OLD_MNIST = {"test_loss": 0.1204, "test_accuracy": 0.9641}  # before runs recorded their validation metrics


def make_run(
    root: Path,
    rel: str,
    model: str,
    data: str,
    metrics: dict[str, float] | None,
    *,
    status: str = "completed",
    epochs: int = 10,
    done: int | None = None,
    duration: float = 83.4,
    started: str = "2026-11-28T05:52:16+0000",
    seed: int = 0,
    overrides: list[str] | None = None,
) -> Path:
    folder = root / rel
    folder.mkdir(parents=True)
    summary: dict[str, Any] = {"status": status, "model": model, "data": data, "epochs": epochs, "seed": seed}
    summary |= {"metrics": metrics or {}, "epochs_completed": epochs if done is None else done}
    summary |= {"started_at": started, "duration_s": duration, "parameters": 196}
    (folder / "summary.json").write_text(json.dumps(summary))
    if overrides is not None:  # as Hydra writes it for a run the CLI started
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return folder


def cli(model: str) -> list[str]:
    data = {"boston": "boston", "lstm_charmodel": "text"}.get(model, "digits")
    return [f"model={model}", f"data={data}", "trainer.epochs=10", "figures.enabled=false"]


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    return make_mixed(tmp_path / "outputs")


def make_mixed(root: Path) -> Path:
    """All four models, single runs in Hydra's dated folders and a sweep's jobs, old runs with test_* only,
    runs that did not complete, a long path: 12 runs."""
    make_run(root, "2026-11-28/05-52-16", "boston", "boston", regression(24.51, 21.33), overrides=cli("boston"))
    make_run(
        root, "2026-11-28/06-10-02", "mnist_cnn", "digits", MNIST, started="2026-11-28T06:10:02+0000", duration=912
    )
    make_run(
        root,
        "2026-11-27/07-00-00",
        "autoencoder",
        "digits",
        {"val_loss": 0.0693, "val_mse": 0.0693, "test_loss": 0.0688, "test_mse": 0.0688},
        status="interrupted",
        done=3,
        started="2026-11-27T07:00:00+0000",
        overrides=cli("autoencoder"),
    )
    make_run(root, "2026-11-27/08-00-00", "lstm_charmodel", "text", LSTM, started="2026-11-27T08:00:00+0000")
    for job, (lr, seed) in enumerate([("0.1", 1), ("0.01", 2)]):
        make_run(
            root,
            f"multirun/2026-11-26/09-00-00/{job}",
            "boston",
            "boston",
            regression(30.0 - job, 25.0 - 3 * job),
            seed=seed,
            started=f"2026-11-26T09:00:0{job}+0000",
            overrides=[*cli("boston"), f"optimizer.lr={lr}", f"seed={seed}"],
        )
    make_run(root, "old/mnist_lr", "mnist_cnn", "digits", OLD_MNIST, started="2025-03-01T10:00:00+0000")
    make_run(root, "old/boston", "boston", "boston", regression(None, 17.5), started="2025-03-02T10:00:00+0000")
    long = "experiments/ablation-of-the-character-model-hidden-sizes/lstm_charmodel_hidden512_dropout0.5/seed3"
    make_run(root, long, "lstm_charmodel", "text", LSTM, started="2026-11-25T10:00:00+0000")
    make_run(root, "2026-11-28/07-00-00", "mnist_cnn", "digits", None, status="failed", done=0, duration=1.5)
    diverged = {"val_loss": math.nan}
    make_run(root, "2026-11-28/08-00-00", "boston", "boston", diverged, status="diverged", done=4, duration=2.25)
    make_run(root, "2026-11-28/09-00-00", "mnist_cnn", "digits", MNIST, status="running", done=2)  # no lock: killed
    for folder in ("07-00-00", "08-00-00", "09-00-00"):  # started when their folders say
        summary = json.loads((root / "2026-11-28" / folder / "summary.json").read_text())
        summary["started_at"] = f"2026-11-28T{folder.replace('-', ':')}+0000"
        (root / "2026-11-28" / folder / "summary.json").write_text(json.dumps(summary))
    return root


RUNS = 12


def table(out: str) -> tuple[list[str], list[list[str]]]:
    """The header's cells and each row's cells of the printed table."""
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if "┃" in line)
    header = [c.strip() for c in lines[at].split("┃")]
    rows = [[c.strip() for c in line.split("│")] for line in lines[at + 2 :] if "│" in line]
    return header, rows


def column(out: str, name: str) -> list[str]:
    header, rows = table(out)
    return [row[header.index(name)] for row in rows]


def test_the_default_table_fits_100_characters_one_line_a_run(run_here, mixed: Path) -> None:
    out = run_here("runs", str(mixed), cwd=mixed.parent)
    assert out.returncode == 0 and out.stderr == ""
    assert max(len(line) for line in out.stdout.splitlines()) <= TABLE_WIDTH
    header, rows = table(out.stdout)
    assert header[:6] == ["run", "model", "status", "epochs", "val_loss", "test"]
    assert header.count("model") == 1  # the summary's and the override's: one column
    assert len(rows) == RUNS and all(len(row) == len(header) for row in rows)  # no row folded onto two lines
    assert f"{RUNS} run(s) under {mixed}" in out.stdout
    runs = column(out.stdout, "run")
    assert "2026-11-28/05-52-16" in runs and "old/mnist_lr" in runs  # whole where they fit
    (job,) = [r for r in runs if r.endswith("09-00-00/1")]
    assert "…" in job and len(job) < len("multirun/2026-11-26/09-00-00/1")
    (long,) = [r for r in runs if r.startswith("experiments")]
    assert "…" in long and long.endswith("/seed3")  # shortened in its middle
    # the varying overrides that did not fit are named, not silently dropped
    assert "not shown for width:" in out.stdout and "optimizer.lr" in out.stdout
    assert "killed: no process is writing it" in out.stdout


def test_a_narrow_terminal_gets_a_narrower_table(run_here, mixed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    monkeypatch.setattr(runs_module, "table_console", lambda: Console(width=72))
    out = run_here("runs", str(mixed), cwd=mixed.parent)
    assert out.returncode == 0 and max(len(line) for line in out.stdout.splitlines()) <= 72
    header, rows = table(out.stdout)
    assert {"run", "model", "status", "val_loss", "test"} <= set(header) and len(rows) == RUNS


def test_val_is_the_validation_loss_and_test_the_models_own_metric(run_here, mixed: Path) -> None:
    out = run_here("runs", str(mixed), "--sort", "run", cwd=mixed.parent)
    cells = dict(
        zip(
            column(out.stdout, "run"),
            zip(column(out.stdout, "val_loss"), column(out.stdout, "test"), strict=True),
            strict=True,
        )
    )
    assert cells["2026-11-28/05-52-16"] == ("24.51", "mse 21.33")
    assert cells["2026-11-28/06-10-02"] == ("0.0871", "acc 0.9712")  # a classifier: its accuracy
    assert cells["2026-11-27/08-00-00"] == ("2.31", "loss 2.306")  # the character model: its loss, as the book
    assert cells["old/mnist_lr"] == ("0.1204*", "acc 0.9641")  # an old run: its test_loss, starred
    assert cells["2026-11-28/07-00-00"] == ("", "")  # failed before any metric
    assert cells["2026-11-28/08-00-00"] == ("nan", "")
    assert "*: test_loss: the run recorded no validation metrics" in out.stdout


def test_one_kind_of_run_names_its_metrics_in_the_headers(run_here, mixed: Path) -> None:
    out = run_here("runs", str(mixed / "multirun"), cwd=mixed.parent)
    header, rows = table(out.stdout)
    # a sweep's jobs: the metric in the header, numbers in the cells, the swept overrides beside them; the
    # jobs' folders named from the sweep's, which the title names, to make room for them
    title = "".join(out.stdout.split())  # a long path wraps where rich chooses (a tmp folder of a test worker)
    assert f"2run(s)under{mixed / 'multirun' / '2026-11-26' / '09-00-00'}".replace(" ", "") in title
    assert [row[0] for row in rows] == ["0", "1"]
    assert header == [
        "run",
        "model",
        "status",
        "epochs",
        "val_loss",
        "test_mse",
        "duration",
        "started",
        "optimizer.lr",
        "seed",
    ]
    assert [row[header.index("test_mse")] for row in rows] == ["25", "22"]
    assert [row[header.index("started")] for row in rows] == ["09:00:00", "09:00:01"]
    assert "started on 2026-11-26" in out.stdout  # the day once, above the table
    assert [row[header.index("duration")] for row in rows] == ["1m23s", "1m23s"]
    assert "not shown" not in out.stdout and "*" not in out.stdout


def test_all_is_every_column_and_model_once(run_here, mixed: Path) -> None:
    out = run_here("runs", str(mixed), "--all", cwd=mixed.parent)
    assert out.returncode == 0
    header, rows = table(out.stdout)
    assert header.count("model") == 1 and header.count("data") == 1 and "seed" in header
    assert {"optimizer.lr", "val_mse", "test_bpc", "test_accuracy", "val_accuracy", "test_mae"} <= set(header)
    assert len(rows) == RUNS


def test_columns_chooses_them(run_here, mixed: Path) -> None:
    asked = "run,test_accuracy,optimizer.lr,parameters,duration_s,data"
    out = run_here("runs", str(mixed), "--columns", asked, "--model", "mnist_cnn", cwd=mixed.parent)
    assert out.returncode == 0, out.stderr
    header, rows = table(out.stdout)
    assert header == ["run", "test_accuracy", "optimizer.lr", "parameters", "duration_s", "data"]
    assert len(rows) == 4 and {row[1] for row in rows} == {"0.9712", "0.9641", ""}
    assert {row[2] for row in rows} == {""} and "83.4" in {row[4] for row in rows}  # no mnist run swept the lr

    bad = run_here("runs", str(mixed), "--columns", "run,bogus", cwd=mixed.parent)
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.splitlines()) == 1
    assert "--columns bogus: no such column" in bad.stderr
    both = run_here("runs", str(mixed), "--columns", "run", "--all", cwd=mixed.parent)
    assert both.returncode == 2 and len(both.stderr.splitlines()) == 1 and "not allowed with" in both.stderr


def test_csv_and_json_hold_every_column_unabridged(run_here, mixed: Path) -> None:
    out = run_here("runs", str(mixed), "--format", "csv", "--sort", "run", cwd=mixed.parent)
    assert out.returncode == 0 and out.stderr == ""
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert len(rows) == RUNS
    assert list(rows[0])[:5] == ["run", "model", "data", "status", "seed"]
    assert {"optimizer.lr", "test_bpc", "epochs_completed", "duration_s", "started_at", "error"} <= set(rows[0])
    by_run = {r["run"]: r for r in rows}
    long = next(r for r in by_run if r.startswith("experiments"))
    assert long.endswith("lstm_charmodel_hidden512_dropout0.5/seed3") and "…" not in long
    assert float(by_run["2026-11-28/05-52-16"]["test_rmse"]) == math.sqrt(21.33)  # every digit
    assert by_run["multirun/2026-11-26/09-00-00/1"]["optimizer.lr"] == "0.01"
    assert by_run["old/mnist_lr"]["val_loss"] == "" and by_run["2026-11-28/09-00-00"]["status"] == "killed"

    out = run_here("runs", str(mixed), "--format", "json", "--sort", "run", cwd=mixed.parent)
    assert out.returncode == 0
    data = json.loads(out.stdout)  # the whole of stdout: nothing else is printed
    assert isinstance(data, list) and len(data) == RUNS and all(isinstance(r, dict) for r in data)
    by_run = {r["run"]: r for r in data}
    boston = by_run["2026-11-28/05-52-16"]
    assert boston["test_mse"] == 21.33 and boston["epochs"] == 10 and boston["duration_s"] == 83.4
    assert boston["started_at"] == "2026-11-28T05:52:16+0000" and boston["test_accuracy"] is None
    assert by_run["2026-11-28/08-00-00"]["val_loss"] is None  # NaN is not JSON: null (the status says diverged)
    assert by_run["multirun/2026-11-26/09-00-00/0"]["seed"] == 1

    out = run_here(
        "runs", str(mixed), "--format", "json", "--columns", "run,val,test", "--limit", "1", cwd=mixed.parent
    )
    assert json.loads(out.stdout) == [{"run": "old/mnist_lr", "val": None, "test": 0.9641}]  # val: val_loss alone


def test_a_run_folder_itself(run_here, mixed: Path) -> None:
    out = run_here("runs", str(mixed / "2026-11-28" / "05-52-16"), "--format", "json", cwd=mixed.parent)
    (run,) = json.loads(out.stdout)
    assert run["run"] == str(mixed / "2026-11-28" / "05-52-16") and run["model"] == "boston"
    out = run_here("runs", str(mixed / "2026-11-28" / "05-52-16"), cwd=mixed.parent)
    assert out.returncode == 0 and len(table(out.stdout)[1]) == 1
    assert max(len(line) for line in out.stdout.splitlines()) <= TABLE_WIDTH


def test_no_runs_is_an_empty_table_csv_or_json(run_here, tmp_path: Path) -> None:
    assert "0 run(s)" in run_here("runs", str(tmp_path), cwd=tmp_path).stdout
    assert json.loads(run_here("runs", str(tmp_path), "--format", "json", cwd=tmp_path).stdout) == []
    assert run_here("runs", str(tmp_path), "--format", "csv", cwd=tmp_path).stdout.startswith("run,model,")


@pytest.mark.parametrize("value", ["-1", "0", "1.5", "x", "", "-0"])
def test_a_bad_limit_is_one_line_and_exit_2(run_here, mixed: Path, value: str) -> None:
    out = run_here("runs", str(mixed), "--limit", value, cwd=mixed.parent)
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) == 1 and "dlfs runs: argument --limit:" in out.stderr


def test_limit_shows_the_first_n_and_says_so(run_here, mixed: Path) -> None:
    out = run_here("runs", str(mixed), "--limit", "3", cwd=mixed.parent)
    assert out.returncode == 0 and len(table(out.stdout)[1]) == 3
    assert "(the first 3 of 12)" in " ".join(out.stdout.split())  # a long PATH: the title wraps
    assert "(the first" not in run_here("runs", str(mixed), "--limit", "99", cwd=mixed.parent).stdout


def test_sort_by_any_column_and_runs_without_the_value_last(run_here, mixed: Path) -> None:
    def sorted_by(*args: str, name: str | None = None) -> list[str]:
        out = run_here("runs", str(mixed), "--sort", *args, cwd=mixed.parent)
        assert out.returncode == 0, out.stderr
        return column(out.stdout, name or args[0])

    mses = sorted_by("test_mse")  # not a default column: shown, as the sort's reason
    assert mses[:5] == ["0.0688", "17.5", "21.33", "22", "25"] and mses[5:] == [""] * (RUNS - 5)
    accuracies = sorted_by("test_accuracy", "--reverse")
    assert accuracies[:4] == ["0.9712", "0.9712", "0.9641", "0.3544"] and accuracies[-1] == ""
    vals = sorted_by("val", name="val_loss")
    numbers = [float(v) for v in vals[:8]]
    assert numbers == sorted(numbers) and sorted(vals[8:]) == ["", "0.1204*", "17.5*", "nan"]  # none or NaN: last
    assert sorted_by("val", "--reverse", name="val_loss")[:2] == ["30", "29"]
    assert sorted_by("optimizer.lr", "--columns", "run,optimizer.lr", name="optimizer.lr")[:2] == ["0.01", "0.1"]
    assert sorted_by("duration_s", name="duration")[0] == "1.5s"  # the summary's name for the duration too
    assert sorted_by("status")[:2] == ["completed"] * 2
    started = sorted_by("started", "--reverse", "--columns", "run,started_at", name="started_at")
    assert started[0] == "2026-11-28T09:00:00+0000" and started[-1] == "2025-03-01T10:00:00+0000"
    assert sorted_by("run")[0] == "2026-11-27/07-00-00"

    bad = run_here("runs", str(mixed), "--sort", "bogus", cwd=mixed.parent)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "--sort bogus: no such column" in bad.stderr


def test_a_long_path_is_shortened_in_its_middle() -> None:
    assert shorten("multirun/2026-11-26/09-00-00/3", 40) == "multirun/2026-11-26/09-00-00/3"
    assert shorten("multirun/2026-11-26/09-00-00/3", 23) == "…/2026-11-26/09-00-00/3"
    assert shorten("multirun/2026-11-26/09-00-00/3", 21) == "multirun/…/09-00-00/3"
    # the folder that tells the runs apart is kept in part rather than dropped whole
    assert shorten("repro/improved_lstm_charmodel/seed0", 26) == "repro/improv…armodel/seed0"
    assert len(shorten("a" * 50, 10)) == 10


def test_the_table_drawn_by_hand_is_the_one_rich_draws(mixed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default table's rows are joined by hand when every column fits (rich's layout of 2,000 rows took a
    second): the same characters as rich's Table, in a pipe and, colours aside, in a colour terminal."""
    import contextlib
    import re

    from rich.console import Console

    def printed(by_hand: bool, terminal: bool) -> str:
        buffer = io.StringIO()
        console = Console(
            file=buffer, width=100, force_terminal=terminal, color_system="truecolor" if terminal else None
        )
        with monkeypatch.context() as m:
            m.setattr(runs_module, "table_console", lambda: console)
            if not by_hand:
                m.setattr(runs_module, "_lines_that_fit", lambda *args: None)
            with contextlib.redirect_stdout(buffer):
                runs_module.list_runs([str(mixed)])
        return buffer.getvalue()

    plain = printed(True, False)
    assert "│" in plain and plain == printed(False, False)
    # what rich draws its own way (an :emoji: code, a line break in a name): rich draws the whole table
    for name in ("a:smile:b", "line\nbreak"):
        (mixed / name).mkdir()
        (mixed / "old" / "boston").rename(mixed / name / "run")
        assert printed(True, False) == printed(False, False)
        (mixed / name / "run").rename(mixed / "old" / "boston")
    coloured = printed(True, True)
    assert "\x1b[32mcompleted\x1b[0m" in coloured  # the status in its colour, as rich's table has it
    no_colour = re.compile(r"\x1b\[[0-9;]*m")
    assert no_colour.sub("", coloured) == no_colour.sub("", printed(False, True)) == plain


def test_hydra_yaml_read_without_the_yaml_parser_says_what_the_parser_says(run_here, tmp_path: Path) -> None:
    """`dlfs runs` reads a job's number and command from the lines Hydra writes; any other layout goes to the
    YAML parser, which reads it or calls it unreadable."""
    import yaml

    smoke = [*SMOKE, "figures.enabled=false"]
    assert run_here("train", "-m", "seed=1,2", *smoke, "hydra.sweep.dir=sweep", cwd=tmp_path).returncode == 0
    assert run_here("train", *smoke, "hydra.run.dir=single", cwd=tmp_path).returncode == 0
    texts = [(tmp_path / f / ".hydra" / "hydra.yaml").read_text() for f in ("sweep/0", "sweep/1", "single")]
    read = [runs_module._job_as_hydra_writes_it(t) for t in texts]
    parsed = [yaml.safe_load(t)["hydra"]["job"] for t in texts]
    assert read == [(0, "train"), (1, "train"), (None, "train")]
    assert read == [(j["num"] if isinstance(j["num"], int) else None, j["name"]) for j in parsed]
    assert runs_module._job_as_hydra_writes_it("hydra:\n  job: {name: train, num: 3}\n") is None  # YAML's to read
    assert runs_module._job_as_hydra_writes_it(texts[1].replace("    num: 1", "    num: [1]")) is None


def one_line_error(out: Any) -> str:
    """The one line a refused `dlfs runs` prints: exit 2, nothing on stdout, no traceback."""
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith("dlfs")
    return line


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("overrides.yaml", b"\xff\xfe\n", "unreadable .hydra/overrides.yaml: not UTF-8 text"),
        ("overrides.yaml", b": : :\n", "unreadable .hydra/overrides.yaml: not YAML: "),
        ("overrides.yaml", b"- optimizer.lr=0.1\n- [a]\n", "item 2 is a YAML list, not an override"),
        ("overrides.yaml", b"optimizer.lr: 0.1\n", "unreadable .hydra/overrides.yaml: a YAML dict, not a list"),
        ("hydra.yaml", b"\xff\n", "unreadable .hydra/hydra.yaml: not UTF-8 text"),
        ("hydra.yaml", b"- 1\n", "unreadable .hydra/hydra.yaml: a YAML list, not a mapping"),
    ],
)
def test_a_malformed_hydra_file_is_unreadable_and_hides_no_other_run(
    run_here, tmp_path: Path, name: str, text: bytes, reason: str
) -> None:
    root = tmp_path / "r"
    make_run(root, "good", "boston", "boston", regression(24.5, 21.3), overrides=[*cli("boston"), "optimizer.lr=0.1"])
    bad = make_run(root, "b", "boston", "boston", regression(20.0, 19.0), overrides=[*cli("boston"), "optimizer.lr=1"])
    (bad / ".hydra" / name).write_bytes(text)
    for args in ([], ["--all"], ["--sort", "optimizer.lr"], ["--columns", "run,status,optimizer.lr"]):
        out = run_here("runs", str(root), *args, cwd=tmp_path)
        assert out.returncode == 0 and out.stderr == "", out.stderr
        assert dict(zip(column(out.stdout, "run"), column(out.stdout, "status"), strict=True)) == {
            "good": "completed",
            "b": "unreadable",
        }
        assert reason in " ".join(out.stdout.split())  # the reason, below the table
    out = run_here("runs", str(root), "--format", "json", "--sort", "optimizer.lr", cwd=tmp_path)
    by_run = {r["run"]: r for r in json.loads(out.stdout)}
    assert by_run["good"]["status"] == "completed" and by_run["good"]["optimizer.lr"] == "0.1"
    assert by_run["b"]["status"] == "unreadable" and reason in by_run["b"]["error"]
    assert by_run["b"]["test_mse"] == 19.0  # what its summary.json says is still shown


def _refused(folder: str, real: Any) -> Any:
    """os.scandir, but a folder named `folder` cannot be listed, as after chmod 000 (root ignores chmod)."""

    def scandir(path: Any = ".") -> Any:
        if Path(path).name == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    return scandir


def test_a_folder_that_cannot_be_read_is_listed_as_unreadable(
    run_here, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "r"
    make_run(root, "good", "boston", "boston", regression(24.5, 21.3))
    make_run(root, "locked", "boston", "boston", regression(24.5, 21.3))
    stuck = make_run(root, "stuck", "boston", "boston", regression(24.5, 21.3), overrides=cli("boston"))
    monkeypatch.setattr(os, "scandir", _refused("locked", os.scandir))
    # a folder without the x permission: its names can be listed, its files neither looked at nor opened
    real_is_file, real_read_text = Path.is_file, Path.read_text

    def denied(real: Any) -> Any:
        def call(self: Path, *args: Any, **kwargs: Any) -> Any:
            if self.parent in (stuck, stuck / ".hydra"):
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self, *args, **kwargs)

        return call

    monkeypatch.setattr(Path, "is_file", denied(real_is_file))
    monkeypatch.setattr(Path, "read_text", denied(real_read_text))
    out = run_here("runs", str(root), cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert sorted(column(out.stdout, "run")) == ["good", "locked", "stuck"]
    text = " ".join(out.stdout.split())  # the reasons, below the table
    assert "locked: unreadable: cannot list its files: permission denied" in text
    assert "stuck: unreadable: unreadable .hydra/overrides.yaml: permission denied" in text
    out = run_here("runs", str(root), "--format", "json", cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    by_run = {r["run"]: r for r in json.loads(out.stdout)}
    assert {run: r["status"] for run, r in by_run.items()} == {
        "good": "completed",
        "locked": "unreadable",
        "stuck": "unreadable",
    }
    assert by_run["locked"]["error"] == "cannot list its files: permission denied"
    assert "unreadable summary.json: permission denied" in by_run["stuck"]["error"]

    line = one_line_error(run_here("runs", str(root / "locked"), cwd=tmp_path))  # PATH itself: nothing to list
    assert line == f"dlfs: error: {root / 'locked'}: cannot be read: permission denied"


def test_an_unknown_model_is_refused(run_here, mixed: Path) -> None:
    line = one_line_error(run_here("runs", str(mixed), "--model", "nope", cwd=mixed.parent))
    assert line.endswith("--model nope: no such model; valid: autoencoder, boston, lstm_charmodel, mnist_cnn")
    assert "--model '': no such model" in one_line_error(run_here("runs", str(mixed), "--model", "", cwd=mixed.parent))
    assert "--model nope" in one_line_error(run_here("runs", str(mixed.parent), "--model", "nope", cwd=mixed.parent))
    # a model that is no longer in conf/model: its runs can still be listed
    make_run(mixed, "retired", "resnet", "digits", MNIST)
    out = run_here("runs", str(mixed), "--model", "resnet", "--format", "json", cwd=mixed.parent)
    assert out.returncode == 0 and [r["run"] for r in json.loads(out.stdout)] == ["retired"]


def test_an_empty_path_is_refused(run_here, mixed: Path) -> None:
    line = one_line_error(run_here("runs", "", cwd=mixed))  # not the working folder, which Path("") is
    assert line.startswith("dlfs: error: dlfs runs: PATH is empty: name a folder, or leave it out to list outputs/")
    line = one_line_error(run_here("runs", cwd=mixed, env={"DLFS_OUTPUTS": ""}))
    assert line.startswith("dlfs: error: DLFS_OUTPUTS is empty")
    assert run_here("runs", "--format", "json", cwd=mixed.parent, env={"DLFS_OUTPUTS": "outputs"}).returncode == 0
