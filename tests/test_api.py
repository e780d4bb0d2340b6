"""dlfs_cli.api: training, reading back and listing runs from Python; and the README's example, as a script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlfs_cli import api
from dlfs_cli.errors import DlfsError

QUICK = ("trainer.epochs=2", "trainer.limit_batches=3", "device=cpu", "figures.enabled=false")
README = Path(__file__).resolve().parent.parent / "README.md"


def test_train_reads_back_its_run(tmp_path: Path) -> None:
    run = api.train("model=boston", "optimizer.lr=0.02", *QUICK, run_dir=tmp_path / "run")
    assert run.summary.status == "completed" and run.config is not None and run.config.optimizer.lr == 0.02
    assert {"val_loss", "test_loss"} <= set(run.metrics)
    rows = run.history()
    assert [r["split"] for r in rows][-2:] == ["val", "test"] and rows[-1]["loss"] == pytest.approx(
        run.metrics["test_loss"], rel=1e-5
    )
    assert isinstance(rows[0]["step"], int) and rows[0]["accuracy" if "accuracy" in rows[0] else "mse"] is None
    weights = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    model = run.model()
    assert not model.training and all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    best = run.model("best")
    assert isinstance(best, torch.nn.Module)


def test_models_of_every_kind_load_without_their_data(tmp_path: Path) -> None:
    """The model is sized from the config and the checkpoint (the text's vocabulary), not by reading data."""
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be " * 40)
    run = api.train("model=lstm_charmodel", f"data.path={text}", "model.hidden_size=8", *QUICK, run_dir=tmp_path / "l")
    assert run.model().vocab_size == len(set(text.read_text()))
    digits = api.train("model=mnist_cnn", "data=digits", *QUICK, run_dir=tmp_path / "d")
    assert digits.model()(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_runs_lists_them_and_errors_are_the_clis(tmp_path: Path) -> None:
    for name in ("a", "b"):
        api.train(*QUICK, "trainer.epochs=1", run_dir=tmp_path / "outputs" / name)
    assert [r.path.name for r in api.runs(tmp_path / "outputs")] == ["a", "b"]
    with pytest.raises(DlfsError, match="already holds a run"):
        api.train(*QUICK, run_dir=tmp_path / "outputs" / "a")
    with pytest.raises(DlfsError, match="did you mean 'epochs'"):
        api.compose_config("trainer.epocs=3")
    with pytest.raises(DlfsError, match="optimizer.lr"):
        api.compose_config("optimizer.lr=-1")
    with pytest.raises(DlfsError, match="not a run folder"):
        api.load_run(tmp_path)


@pytest.mark.parametrize(
    ("override", "said"),
    [
        (
            "resume=outputs/boston/x",
            r"^resume=: api.train starts a new run; continue one with `dlfs train resume=PATH`",
        ),
        ("hydra.run.dir=elsewhere", r"^hydra.run.dir=: api.train takes the run's folder as run_dir="),
        ("hydra/launcher=joblib", r"^hydra/launcher=: Hydra's own settings are the command line's"),
        ("++hydra.job.name=x", r"^hydra.job.name=: Hydra's own settings"),
        ("trainer.nproc=2", r"^trainer.nproc=2: api.train trains in this process"),
        ("seed=${nope}", r"^invalid value for seed: Interpolation key 'nope' not found"),
        ("optimizer.lr=${oc.env:DLFS_TEST_UNSET}", r"^invalid value for optimizer.lr: .*DLFS_TEST_UNSET"),
        ("~verbose", r"^~verbose: dlfs train needs verbose"),  # read only after the run's folder was made
        ("~sweep", r"^~sweep: dlfs train needs sweep"),  # read only after the run had trained
        ("~model", r"^~model: dlfs train needs model"),
    ],
)
def test_what_only_the_command_line_does_is_refused_naming_the_key(override: str, said: str, tmp_path: Path) -> None:
    """api.train accepts what `dlfs train` accepts with the same meaning, or raises DlfsError naming the key:
    resume=, hydra.run.dir= and trainer.nproc= were dropped without a word (api.train("resume=RUN") trained a
    fresh run from the defaults), and a failing interpolation raised OmegaConf's own error half-way into a run."""
    with pytest.raises(DlfsError, match=said):
        api.train(override, *QUICK, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_model_asked_for_on_a_missing_device_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = api.train(*QUICK, "trainer.epochs=1", run_dir=tmp_path / "run")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DlfsError, match=r"^device=cuda: CUDA is not available on this machine"):
        run.model(device="cuda")


@pytest.mark.slow
def test_the_readmes_python_example_runs_as_a_script(tmp_path: Path) -> None:
    block = re.search(r"## Python.*?```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README: no ```python block under '## Python'"
    (tmp_path / "example.py").write_text(block.group(1))
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "mean test_mse over 3 seeds" in out.stdout


def test_every_error_of_the_api_is_a_dlfs_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a script gets wrong, and what it finds malformed, is a DlfsError naming it, as on the command line:
    these were TypeError, yaml's ParserError, ValueError and torch's RuntimeError."""
    run = api.train(*QUICK, "trainer.epochs=1", run_dir=tmp_path / "outputs" / "run")
    with pytest.raises(DlfsError, match=r"^overrides are KEY=VALUE texts, as on the command line: got 5"):
        api.compose_config(5)  # type: ignore[arg-type]
    with pytest.raises(DlfsError, match=r"^load_run takes a run folder's path: got 5"):
        api.load_run(5)  # type: ignore[arg-type]
    with pytest.raises(DlfsError, match=r"^invalid value for device: 'tpu'"):
        run.model(device="tpu")
    metrics = run.path / "metrics.csv"
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join([rows[0], rows[1].replace(rows[1].split(",")[-1], "x", 1), *rows[2:]]) + "\n")
    with pytest.raises(DlfsError, match=r"metrics\.csv: line 2, column \w+ is 'x', not a number"):
        run.history()

    def with_epoch(value: str) -> str:
        cells = dict(zip(rows[0].split(","), rows[1].split(","), strict=True))
        return ",".join((cells | {"epoch": value}).values())

    for bad_row, said in (
        (rows[1] + ",9", r"line 2 has more cells than the header"),  # was a TypeError
        (with_epoch("nan"), r"column epoch is 'nan'"),  # int(nan): a ValueError of its own
        (with_epoch("1e400"), r"column epoch is '1e400'"),  # int(inf): an OverflowError
    ):
        metrics.write_text("\n".join([rows[0], bad_row, *rows[2:]]) + "\n")
        with pytest.raises(DlfsError, match=said):
            run.history()
    bad = tmp_path / "outputs" / "bad"
    api.train(*QUICK, "trainer.epochs=1", run_dir=bad)
    (bad / "config.yaml").write_text("model: [\n")
    with pytest.raises(DlfsError, match=r"cannot read .*bad/config\.yaml"):
        api.load_run(bad)
    # one malformed run never hides the others, and the default folder is $DLFS_OUTPUTS's, as for `dlfs runs`
    monkeypatch.setenv("DLFS_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path.parent)
    listed = {r.path.name: r.summary for r in api.runs()}
    assert listed["run"].status == "completed" and listed["bad"].status == "unreadable"
    assert "config.yaml" in (listed["bad"].error or "")
