"""Bad input, in every command: one line that names the problem, a non-zero exit, no traceback, and the
folders exactly as they were (nothing overwritten, nothing half-written, nothing left behind).

The commands run in this process (`cli.main`), as `dlfs` would run them: a crash would fail the test with
its traceback. A few cases run `python -m dlfs_cli` as a real process too.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMOKE, Result, run_dlfs

from dlfs_cli import runlock
from dlfs_cli.data.boston import BUNDLED_CSV as BOSTON_CSV
from dlfs_cli.errors import DlfsError
from dlfs_cli.train import train

LONG = "x" * 5000  # longer than any file name may be


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A completed Boston run, made once per worker (under a second): each case gets its own copy. No
    xdist_group: the ~100 cases are spread over the workers, not queued on one."""
    from hydra import compose, initialize_config_dir

    from dlfs_cli.config import conf_dir

    run = tmp_path_factory.mktemp("finished") / "run"
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*SMOKE, "figures.enabled=false"])
    train(cfg, run)
    runlock.release_all()
    return run


@pytest.fixture
def world(tmp_path: Path, finished_run: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working folder of a case: a finished run, a user's own folder, a file, a finished sweep and a
    finished reproduction, an empty folder; the commands run from here."""
    shutil.copytree(finished_run, tmp_path / "run")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.yaml").write_text("my: own\n")
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    (tmp_path / "sweep" / "summary.csv").write_text("job,status\n0,completed\n")
    (tmp_path / "sweep" / "0" / "summary.json").write_text('{"status": "completed"}\n')
    (tmp_path / "repro").mkdir()
    (tmp_path / "repro" / "report.json").write_text("{}\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.csv").write_bytes(b"\x00\xff\xfe binary, not a CSV\n")
    lines = BOSTON_CSV.read_text().splitlines(keepends=True)
    (tmp_path / "nan.csv").write_text(
        lines[0] + lines[1] + "0.1,nan," + lines[2].split(",", 2)[2] + "".join(lines[3:20])
    )
    (tmp_path / "noheader.csv").write_text("".join(lines[1:20]))
    (tmp_path / "huge.csv").write_text(lines[0] + "".join(lines[1:20]).replace(",24\n", ",1e39\n", 1))
    (tmp_path / "huger.csv").write_text(lines[0] + "1e308," + "".join(lines[1:20]).split(",", 1)[1])
    whole = gzip.compress(("to be or not to be " * 200).encode())
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    for name, file, text in (("badconfig", "config.yaml", ": : :\n"), ("badsummary", "summary.json", "[1]\n")):
        shutil.copytree(finished_run, tmp_path / name)
        (tmp_path / name / file).write_text(text)
    (tmp_path / "badconfig" / ".hydra").mkdir()  # as `dlfs train` leaves it: from= reads its overrides too
    (tmp_path / "badconfig" / ".hydra" / "overrides.yaml").write_text("- seed=3\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root, with a hash of each file's bytes (a lock file's holder record
    aside: a refused resume held the lock for a moment)."""
    tree = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.name == runlock.LOCK_FILE:
            tree[key] = "lock"
        else:
            tree[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return tree


def assert_one_line_error(result: Result, code: int, pattern: str) -> None:
    assert result.code == code, (result.code, result.err[-2000:])
    lines = [line for line in result.err.splitlines() if line.startswith("dlfs")]
    assert len(lines) == 1, result.err[-2000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.err and "Traceback" not in result.out


# (id, command line, exit code, what the one line must say). {long}: a name too long for any file system.
CASES = [
    # --- dlfs train: the command line itself
    ("no-key", ["train", "=3"], 2, r"no key before '='"),
    ("no-equals", ["train", "foo"], 2, r"overrides are KEY=VALUE"),
    ("unknown-command", ["trian"], 2, r"unknown command 'trian'; valid commands: train"),
    ("options-first", ["-m", "train"], 2, r"put the command first"),
    ("cfg-with-m", ["train", "-m", "--cfg", "job", "seed=1,2"], 2, r"--cfg and --info show one job"),
    ("list-without-m", ["train", "optimizer.lr=0.1,0.01"], 2, r"optimizer.lr=0.1,0.01 is a list of values: add -m"),
    ("resume-in-sweep", ["train", "-m", "seed=1,2", "resume=run"], 2, r"resume= continues one run; .*sweep"),
    # --- config groups and keys
    (
        "experiment-typo",
        ["train", "experiment=book_bostn"],
        2,
        r"unknown option experiment=book_bostn \(did you mean 'book_boston'\?\)",
    ),
    ("model-typo", ["train", "model=bostn"], 2, r"unknown option model=bostn \(did you mean 'boston'\?\).*mnist_cnn"),
    ("optimizer-typo", ["train", "optimizer=sgdd"], 2, r"unknown option optimizer=sgdd .*adam, sgd"),
    ("loss-unknown", ["train", "loss=nope"], 2, r"unknown option loss=nope; valid choices: cross_entropy, mse"),
    ("launcher-unknown", ["train", "-m", "hydra/launcher=nope", "seed=1,2"], 2, r"unknown option hydra/launcher=nope"),
    ("key-typo", ["train", "trainer.epcohs=3"], 2, r"unknown key 'trainer.epcohs' \(did you mean 'epochs'\?\)"),
    ("key-added", ["train", "+foo=1"], 2, r"unknown key 'foo'"),
    (
        "logger-unknown",
        ["train", "logger=wandb"],
        2,
        r"invalid value for logger: .*expected one of \[csv, tensorboard\]",
    ),
    ("activation-unknown", ["train", "model.activation=swish"], 2, r"invalid value for model.activation"),
    ("key-added-nested", ["train", "+trainer.patience=3"], 2, r"unknown key 'trainer.patience'"),
    ("unparsable", ["train", "optimizer.lr=[1"], 2, r"cannot parse override 'optimizer.lr=\[1'"),
    # an experiment's keys that the chosen option does not have: the reason, on the same line
    (
        "experiment-vs-option",
        ["train", "experiment=book_boston", "optimizer=adam"],
        2,
        r"Key 'momentum' not in 'AdamConfig'",
    ),
    # --- numbers at their extremes
    ("seed-negative", ["train", "seed=-1"], 2, r"invalid value for seed: -1 \(a seed is between 0 and 4294967295\)"),
    ("seed-huge", ["train", "seed=4294967296"], 2, r"invalid value for seed: 4294967296"),
    ("seed-old-key", ["train", "trainer.seed=3"], 2, r"unknown key 'trainer.seed' \(valid keys: .*epochs"),
    ("batch-beyond-64-bit", ["train", "trainer.batch_size=99999999999999999999"], 2, r"trainer.batch_size: .*64-bit"),
    ("batch-huge", ["train", "trainer.batch_size=3000000000"], 2, r"trainer.batch_size: 3000000000 \(must be <="),
    ("batch-zero", ["train", "trainer.batch_size=0"], 2, r"trainer.batch_size: 0 \(must be >= 1\)"),
    ("epochs-negative", ["train", "trainer.epochs=-1"], 2, r"trainer.epochs: -1 \(must be >= 0\)"),
    ("epochs-nan", ["train", "trainer.epochs=nan"], 2, r"invalid value for trainer.epochs"),
    ("epochs-text", ["train", "trainer.epochs=three"], 2, r"invalid value for trainer.epochs"),
    ("lr-inf", ["train", "optimizer.lr=inf"], 2, r"optimizer.lr: inf \(must be a finite number\)"),
    ("lr-nan", ["train", "optimizer.lr=nan"], 2, r"optimizer.lr: nan \(must be a finite number\)"),
    ("lr-negative", ["train", "optimizer.lr=-0.1"], 2, r"optimizer.lr: -0.1 \(must be > 0\)"),
    ("lr-text", ["train", "optimizer.lr=abc"], 2, r"invalid value for optimizer.lr"),
    ("momentum-minus-inf", ["train", "optimizer.momentum=-inf"], 2, r"optimizer.momentum: -inf \(must be a finite"),
    ("dropout-zero", ["train", "model.dropout_keep=0"], 2, r"model.dropout_keep: 0.0 \(keep probability"),
    ("hidden-zero", ["train", "model.hidden_size=0"], 2, r"model.hidden_size: 0 \(must be between 1 and"),
    ("hidden-huge", ["train", "model.hidden_size=99999999999"], 2, r"model.hidden_size: 99999999999"),
    ("filter-even", ["train", "model=mnist_cnn", "data=digits", "model.filter_size=4"], 2, r"model.filter_size: 4"),
    ("test-size", ["train", "data.test_size=1.5"], 2, r"data.test_size: 1.5 \(a fraction"),
    ("limit-zero", ["train", "trainer.limit_batches=0"], 2, r"trainer.limit_batches: 0"),
    ("nproc-zero", ["train", "trainer.nproc=0"], 2, r"trainer.nproc: 0"),
    ("tsne-negative", ["train", "figures.tsne_points=-1"], 2, r"figures.tsne_points: -1"),
    ("scheduler-neither", ["train", "scheduler=exponential"], 2, r"set exactly one of gamma, final_lr"),
    ("device-unknown", ["train", "device=gpu"], 2, r"invalid value for device: 'gpu'"),
    ("device-missing", ["train", "device=cuda:99"], 2, r"device=cuda:99"),
    # --- free text: empty, too long, files that cannot be read
    ("run-dir-empty", ["train", "hydra.run.dir="], 2, r"hydra.run.dir is empty"),
    ("data-path-empty", ["train", "data.path="], 2, r"data.path is empty"),
    ("resume-empty", ["train", "resume="], 2, r"resume is empty"),
    ("data-path-missing", ["train", "data.path=missing file.csv"], 2, r"no such file: /.*/missing file\.csv$"),
    ("data-path-folder", ["train", "data.path=empty"], 2, r"data.path.*empty"),
    ("data-path-garbage", ["train", "data.path=bad.csv"], 2, r"bad.csv"),
    ("data-path-long", ["train", "data.path={long}"], 2, r"\.\.\.x+ \(\d+ characters\): the name is too long"),
    ("run-dir-long", ["train", "hydra.run.dir={long}"], 2, r"the name is too long"),
    ("text-path-missing", ["train", "model=lstm_charmodel", "data.path=nowhere.txt"], 2, r"nowhere.txt"),
    ("mnist-root-missing", ["train", "model=mnist_cnn", "data.root=nowhere", "data.download=false"], 2, r"nowhere"),
    # --- never overwrite: the resolved folder, however it is spelled
    ("run-dir-a-run", ["train", "hydra.run.dir=run"], 2, r"hydra.run.dir=run already holds a run \(summary.json\)"),
    ("run-dir-quoted", ["train", "hydra.run.dir='run'"], 2, r"already holds a run"),
    ("run-dir-plus-plus", ["train", "++hydra.run.dir=run"], 2, r"already holds a run"),
    ("run-dir-env", ["train", "hydra.run.dir=${oc.env:DLFS_TEST_HERE}/run"], 2, r"already holds a run"),
    ("run-dir-interpolated", ["train", "hydra.run.dir=${model.name}/../run"], 2, r"already holds a run"),
    ("run-dir-users-files", ["train", "hydra.run.dir=mine"], 2, r"hydra.run.dir=mine is not empty \(config.yaml\)"),
    ("run-dir-a-file", ["train", "hydra.run.dir=afile"], 2, r"a file, not a folder"),
    ("run-dir-a-sweep", ["train", "hydra.run.dir=sweep"], 2, r"already holds a sweep"),
    ("sweep-dir-a-sweep", ["train", "-m", "seed=1,2", "hydra.sweep.dir=sweep"], 2, r"already holds a sweep"),
    ("sweep-dir-quoted", ["train", "-m", "seed=1,2", "hydra.sweep.dir='sweep'"], 2, r"already holds a sweep"),
    ("sweep-dir-users-files", ["train", "-m", "seed=1,2", "hydra.sweep.dir=mine"], 2, r"is not empty"),
    ("sweep-dir-empty", ["train", "-m", "seed=1,2", "hydra.sweep.dir="], 2, r"hydra.sweep.dir is empty"),
    # Hydra's own keys and options that would write outside the run's folder, or otherwise than dlfs says
    ("sweep-subdir-shared", ["train", "-m", "seed=1,2", "hydra.sweep.subdir=s${seed}"], 2, r"a folder of its own"),
    ("sweep-subdir-outside", ["train", "-m", "seed=1,2", "hydra.sweep.subdir=../run/${hydra.job.num}"], 2, r"'\.\.'"),
    ("output-subdir-named", ["train", "hydra.output_subdir=meta", "optimizer.lr=-1", "hydra.run.dir=new"], 2, r"lr"),
    ("output-subdir-outside", ["train", "hydra.output_subdir=../run/.hydra"], 2, r"hydra.output_subdir=\.\./run"),
    ("experimental-rerun", ["train", "--experimental-rerun", "run/x.pickle"], 2, r"not supported.*from=RUN"),
    ("job-chdir", ["train", "hydra.job.chdir=true"], 2, r"hydra.job.chdir: dlfs never changes the working folder"),
    ("hydra-mode", ["train", "hydra.mode=MULTIRUN", "seed=1,2"], 2, r"hydra.mode: for a sweep use -m"),
    ("config-name", ["train", "-cn", "eval"], 2, r"-cn: each dlfs command has its own config"),
    ("cfg-choice", ["train", "--cfg", "bogus"], 2, r"--cfg bogus: invalid choice; valid choices: job, hydra, all"),
    ("completion-shell", ["train", "-sc", "install=nope"], 2, r"completion is for bash, fish, zsh"),
    ("interpolation-missing", ["train", "trainer.epochs=${nope}"], 2, r"trainer.epochs: Interpolation key 'nope'"),
    ("run-dir-interpolation", ["train", "hydra.run.dir=${oc.env:DLFS_UNSET}/x"], 2, r"hydra.run.dir: .*DLFS_UNSET"),
    ("split-seed-negative", ["train", "data.split_seed=-1"], 2, r"data.split_seed: -1 \(a seed is between 0"),
    ("eval-every-huge", ["train", "trainer.eval_every=3000000000"], 2, r"trainer.eval_every: 3000000000 \(must be <="),
    ("workers-huge", ["train", "data.num_workers=3000000000"], 2, r"data.num_workers: 3000000000 \(must be <="),
    ("resume-nowhere", ["train", "resume=nowhere"], 2, r"resume=nowhere: no such folder"),
    ("resume-bad-config", ["train", "resume=badconfig"], 2, r"resume=badconfig: cannot read badconfig/config.yaml"),
    ("resume-bad-summary", ["train", "resume=badsummary"], 2, r"cannot read summary.json: a JSON list, not an obj"),
    ("from-bad-config", ["train", "from=badconfig", "hydra.run.dir=new"], 2, r"from=.*badconfig/config.yaml"),
    ("resume-not-a-run", ["train", "resume=mine"], 2, r"resume=mine: not a dlfs run folder"),
    # a folder with runs below it is no sweep (it re-ran every unfinished run under it; resume=/ searched the
    # whole file system): a sweep's folder is one a sweep made, with its multirun.yaml
    ("resume-runs-below", ["train", "resume=."], 2, r"resume=\.: not a dlfs run folder .*, nor a sweep's folder"),
    ("resume-root", ["train", "resume=/"], 2, r"resume=/: not a dlfs run folder"),
    ("resume-moved", ["train", "resume=run", "hydra.run.dir=elsewhere"], 2, r"resume= continues a run in its own"),
    ("resume-changes-model", ["train", "resume=run", "model.hidden_size=3"], 2, r"resume cannot change model"),
    # --- dlfs eval
    ("eval-no-run", ["eval"], 2, r"dlfs eval needs a run folder"),
    ("eval-empty", ["eval", "run="], 2, r"run is empty"),
    ("eval-nowhere", ["eval", "run=nowhere"], 2, r"run=nowhere: no such folder"),
    ("eval-not-a-run", ["eval", "run=mine"], 2, r"no checkpoints/last.pt"),
    ("eval-checkpoint", ["eval", "run=run", "checkpoint=worst"], 2, r"invalid value for checkpoint"),
    ("eval-device", ["eval", "run=run", "device=gpu"], 2, r"invalid value for device"),
    ("eval-added-key", ["eval", "run=run", "+foo=1"], 2, r"unknown key 'foo' \(valid keys: checkpoint, device, run\)"),
    ("eval-multirun", ["eval", "-m", "run=run,run"], 2, r"dlfs eval takes no -m"),
    # --- dlfs generate
    ("generate-no-run", ["generate"], 2, r"dlfs generate needs a run folder"),
    ("generate-length", ["generate", "run=run", "length=-1"], 2, r"invalid value for length: -1"),
    ("generate-length-long", ["generate", "run=nowhere", "length=3000000000"], 2, r"length: 3000000000 \(must be"),
    ("generate-length-huge", ["generate", "run=run", "length=99999999999999999999"], 2, r"length: .*64-bit"),
    ("generate-temperature", ["generate", "run=run", "temperature=-1"], 2, r"invalid value for temperature"),
    ("generate-temperature-nan", ["generate", "run=run", "temperature=nan"], 2, r"temperature: nan \(must be a finite"),
    ("generate-seed", ["generate", "run=run", "seed=-5"], 2, r"invalid value for seed: -5"),
    ("generate-not-lstm", ["generate", "run=run"], 2, r"lstm_charmodel"),
    ("generate-added-key", ["generate", "run=run", "+a.b=1"], 2, r"unknown key 'a'"),
    ("generate-prime-as-typed", ["generate", "run=nowhere", "prime=To be, or not: é"], 2, r"run=nowhere: no such"),
    # --- dlfs runs
    ("runs-nowhere", ["runs", "nowhere"], 2, r"nowhere: no such folder"),
    ("runs-limit", ["runs", ".", "--limit", "-1"], 2, r"dlfs runs: argument --limit"),
    ("runs-sort", ["runs", ".", "--sort", "bogus"], 2, r"--sort bogus: no such column"),
    ("runs-status", ["runs", ".", "--status", "weird"], 2, r"dlfs runs: argument --status"),
    ("runs-option", ["runs", "--bogus"], 2, r"unrecognized arguments: --bogus"),
    (
        "loss-regression",
        ["train", "model=boston", "loss=cross_entropy"],
        2,
        r"error: loss=cross_entropy does not fit model=boston: .*; use loss=mse$",
    ),
    (
        "loss-classifier",
        ["train", "model=mnist_cnn", "data=digits", "loss=mse"],
        2,
        r"error: loss=mse does not fit model=mnist_cnn",
    ),
    ("loss-lstm", ["train", "model=lstm_charmodel", "loss=mse"], 2, r"use loss=cross_entropy$"),
    ("loss-autoencoder", ["train", "model=autoencoder", "data=digits", "loss=cross_entropy"], 2, r"use loss=mse$"),
    # data are checked as data: every cell finite, a header that is one, an archive that opens
    ("csv-nan", ["train", "data.path=nan.csv"], 2, r"nan\.csv: line 3, column 2 is nan, not a finite number"),
    ("csv-float32", ["train", "data.path=huge.csv"], 2, r"huge\.csv: line 2, column 14 is 1e\+39, beyond float32's"),
    ("csv-float32-feature", ["train", "data.path=huger.csv"], 2, r"huger\.csv: line 2, column 1 is 1e\+308, beyond"),
    (
        "csv-no-header",
        ["train", "data.path=noheader.csv"],
        2,
        r"noheader\.csv: its first line is numbers, not a header",
    ),
    (
        "text-cut-gz",
        ["train", "model=lstm_charmodel", "data.path=cut.txt.gz"],
        2,
        r"cut\.txt\.gz: not a gzip file that",
    ),
    # a run or a sweep written inside a run's folder: hidden from dlfs runs, mixed with that run's files
    ("run-in-a-run", ["train", "hydra.run.dir=run/checkpoints/nested"], 2, r"is inside the run folder .*/run: choose"),
    ("sweep-in-a-run", ["train", "-m", "seed=1,2", "hydra.sweep.dir=run/sw"], 2, r"hydra.sweep.dir=run/sw is inside"),
    # a key deleted that the run reads only after its folder is made (~verbose) or after it trained (~sweep)
    ("delete-verbose", ["train", "~verbose"], 2, r"~verbose: dlfs train needs verbose; set it"),
    ("delete-sweep", ["train", "~sweep"], 2, r"~sweep: dlfs train needs sweep; set it"),
    ("delete-sweep-m", ["train", "-m", "seed=1,2", "~verbose"], 2, r"~verbose: dlfs train needs verbose"),
    ("sweep-the-ranking", ["train", "-m", "sweep.metric=val_loss,val_mae"], 2, r"sweep.metric is how the sweep ranks"),
    ("sweep-the-direction", ["train", "-m", "sweep.direction=minimize,maximize"], 2, r"sweep.direction is how"),
    # a sweep's own settings that cannot mean anything: refused before its folder is made
    (
        "sweep-direction-contradicts",
        ["train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", "hydra.sweeper.n_trials=1"],
        2,
        r"hydra.sweeper.direction=maximize contradicts sweep.direction=auto \(minimize val_loss\)",
    ),
    (
        "sweep-direction-list",
        ["train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.direction=[minimize,maximize]"],
        2,
        r"hydra.sweeper.direction=\['minimize', 'maximize'\] contradicts",
    ),
    (
        "sweep-metric-unknown",
        ["train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "sweep.metric=val_accuracy"],
        2,
        r"sweep.metric=val_accuracy is not a metric of model=boston with loss=mse; it reports: val_loss",
    ),
    (
        "sweep-metric-no-validation",
        ["train", "-m", "seed=1,2", "experiment=book_boston"],
        2,
        r"sweep.metric=val_loss is not a metric .*data.val_fraction=0.*it reports: test_loss, test_mse",
    ),
    ("sweep-no-trials", ["train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=0"], 2, r"n_trials: 0 \("),
    ("sweep-trials-negative", ["train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=-3"], 2, r"n_trials: -3"),
    ("sweep-no-trial-jobs", ["train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_jobs=0"], 2, r"n_jobs: 0"),
    (
        "sweep-failure-rate",
        ["train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.max_failure_rate=2"],
        2,
        r"max_failure_rate: 2 \(a fraction in \[0, 1\]\)",
    ),
    ("sweep-batch", ["train", "-m", "seed=1,2", "hydra.sweeper.max_batch_size=0"], 2, r"max_batch_size: 0"),
    (
        "sweep-joblib-none",
        ["train", "-m", "seed=1,2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=0"],
        2,
        r"hydra.launcher.n_jobs: 0",
    ),
    # a text beyond the size limit is refused once it has read that much, not after reading it all
    (
        "text-too-long",
        ["train", "model=lstm_charmodel", "data.max_chars=1000"],
        2,
        r"dlfs_book_input\.txt\.gz: more than data\.max_chars=1,000 characters; raise it",
    ),
    (
        "text-max-chars",
        ["train", "model=lstm_charmodel", "data.max_chars=0"],
        2,
        r"invalid value for data.max_chars: 0",
    ),
    (
        "figure-row",
        ["train", "model=autoencoder", "data=digits", "figures.random_codes=100000"],
        2,
        r"invalid value for figures.random_codes: 100000 \(one row of a figure: at most 100\)",
    ),
    # --- dlfs reproduce
    ("reproduce-only", ["reproduce", "quick=true", "only=[nope]"], 2, r"only: unknown experiment nope"),
    ("reproduce-seeds", ["reproduce", "quick=true", "seeds=[]"], 2, r"seeds: give at least one seed"),
    ("reproduce-only-twice", ["reproduce", "quick=true", "only=[book_boston,book_boston]"], 2, r"more than once"),
    ("reproduce-device", ["reproduce", "device=gpu"], 2, r"invalid value for device"),
    ("reproduce-added-key", ["reproduce", "quick=true", "++foo=2"], 2, r"unknown key 'foo'"),
    ("reproduce-existing", ["reproduce", "quick=true", "hydra.run.dir=repro"], 2, r"already holds a reproduction"),
    ("reproduce-users-files", ["reproduce", "quick=true", "hydra.run.dir=mine"], 2, r"is not empty"),
    ("reproduce-seed-negative", ["reproduce", "quick=true", "seeds=[-1]"], 2, r"seed"),
    (
        "reproduce-metric",
        ["reproduce", "quick=true", "only=[book_boston]", "targets.0.metric=test_nope"],
        2,
        r"targets: book_boston's metric test_nope is not one book_boston reports: test_loss",
    ),
]


@pytest.mark.parametrize(("args", "code", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(
    world: Path, dlfs, monkeypatch: pytest.MonkeyPatch, args: list[str], code: int, pattern: str
) -> None:
    monkeypatch.setenv("DLFS_TEST_HERE", str(world))
    before = snapshot(world)
    result = dlfs(*(a.replace("{long}", LONG) for a in args))
    assert_one_line_error(result, code, pattern)
    assert snapshot(world) == before  # nothing overwritten, nothing half-written, nothing left behind


def test_enough_cases() -> None:
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_a_real_process_says_one_line_too(tmp_path: Path) -> None:
    """python -m dlfs_cli, with no Python in between to catch anything."""
    for args, pattern in (
        (["train", "=3"], r"no key before '='"),
        (["train", "experiment=book_bostn"], r"did you mean 'book_boston'"),
        (["train", "seed=-1"], r"invalid value for seed"),
    ):
        out = run_dlfs(*args, cwd=tmp_path)
        assert_one_line_error(Result(out.returncode, out.stdout, out.stderr), 2, pattern)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_outputs_folder_from_the_environment_is_refused(
    world: Path, dlfs, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """DLFS_OUTPUTS= (set, empty) made `dlfs train` write /boston/<time> at the file system's root."""
    monkeypatch.setenv("DLFS_OUTPUTS", value)
    before = snapshot(world)
    for args in (["train", *SMOKE], ["train", "-m", "seed=1,2"], ["reproduce", "quick=true"], ["runs"]):
        result = dlfs(*args)
        assert_one_line_error(
            result, 2, r"error: DLFS_OUTPUTS is empty: unset it \(runs go to outputs/\) or name a folder"
        )
    from dlfs_cli import api

    with pytest.raises(DlfsError, match=r"^DLFS_OUTPUTS is empty"):
        api.train(*SMOKE)
    assert snapshot(world) == before


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("DLFS_RUN_STAMP", "", r"DLFS_RUN_STAMP='': a run folder's name"),  # the model's folder was the run
        ("DLFS_RUN_STAMP", "../../escaped", r"DLFS_RUN_STAMP='../../escaped': a run folder's name"),
        ("WORLD_SIZE", "abc", r"WORLD_SIZE='abc': torchrun sets it to a number"),  # a ValueError traceback
        ("WORLD_SIZE", "2", r"WORLD_SIZE=2 without RANK: run it under torchrun"),  # a KeyError traceback
        ("WORLD_SIZE", "²", r"WORLD_SIZE='²': torchrun sets it to a number"),  # a digit to isdigit, not to int
    ],
)
def test_the_environment_a_run_reads_is_checked_before_anything_is_written(
    world: Path, dlfs, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, said: str
) -> None:
    monkeypatch.setenv(variable, value)
    before = snapshot(world)
    for args in (["train", *SMOKE], ["train", "-m", "seed=1,2", *SMOKE], ["reproduce", "quick=true"]):
        assert_one_line_error(dlfs(*args), 2, said)
    from dlfs_cli import api

    with pytest.raises(DlfsError, match=said):
        api.train(*SMOKE)
    assert snapshot(world) == before


def test_a_summary_json_of_another_tool_above_is_not_a_run(world: Path, dlfs) -> None:
    """A run folder inside a run's folder is refused; a folder that merely has a file named summary.json (another
    tool's, in /tmp or a home folder) is not a run's, and does not refuse the runs below it."""
    (world / "other").mkdir()
    (world / "other" / "summary.json").write_text("{}\n")
    assert dlfs("train", *SMOKE, "figures.enabled=false", "hydra.run.dir=other/run").code == 0


def test_a_relative_data_path_is_saved_absolute(world: Path, dlfs, run_here) -> None:
    """data.path was saved as typed: from another folder, dlfs eval, resume= and from= said the file did not exist."""
    (world / "data").mkdir()
    (world / "data" / "mine.csv").write_text(BOSTON_CSV.read_text())
    assert dlfs("train", *SMOKE, "data.path=data/mine.csv", "hydra.run.dir=rel").code == 0
    saved = (world / "rel" / "config.yaml").read_text()
    assert f"path: {world / 'data' / 'mine.csv'}" in saved
    (world / "elsewhere").mkdir()
    out = run_here("eval", "run=../rel", cwd=world / "elsewhere")
    assert out.returncode == 0, out.stderr
    # from=: composed again from the recorded overrides (data.path=data/mine.csv), which name the file from where
    # the run was started
    out = run_here("train", "from=../rel", "hydra.run.dir=again", cwd=world / "elsewhere")
    assert out.returncode == 0, out.stderr
    assert f"path: {world / 'data' / 'mine.csv'}" in (world / "elsewhere" / "again" / "config.yaml").read_text()


def test_a_sweep_with_a_relative_data_path_is_resumed_from_another_folder(world: Path, run_here) -> None:
    """A job killed before it wrote anything is run again from its recorded overrides: its relative data.path
    is the file next to where the sweep was started, not one next to where resume= is given."""
    (world / "mine.csv").write_text(BOSTON_CSV.read_text())
    out = run_here("train", "-m", "seed=1,2", *SMOKE, "data.path=mine.csv", "hydra.sweep.dir=sw", cwd=world)
    assert out.returncode == 0, out.stderr
    for name in ("summary.json", "config.yaml", "metrics.csv"):  # as if killed before it began
        (world / "sw" / "1" / name).unlink()
    (world / "elsewhere").mkdir()
    out = run_here("train", "resume=../sw", cwd=world / "elsewhere")
    assert out.returncode == 0, out.stderr
    assert json.loads((world / "sw" / "1" / "summary.json").read_text())["status"] == "completed"


def test_a_malformed_summary_never_hides_the_other_runs(world: Path, dlfs) -> None:
    for name, text in (("list", "[1, 2, 3]\n"), ("text", "not json"), ("numbers", '{"status": 3, "metrics": [1]}')):
        (world / "bad" / name).mkdir(parents=True)
        (world / "bad" / name / "summary.json").write_text(text)
    result = dlfs("runs", ".")
    assert result.code == 0 and "Traceback" not in result.err
    assert "7 run(s)" in result.out and "completed" in result.out  # run/, badconfig/, badsummary/, sweep/0, 3 bad
    assert result.out.count("unreadable") >= 3  # listed, with the reason
    assert "JSON list, not an object" in result.out


def test_free_text_is_taken_as_typed(world: Path, dlfs) -> None:
    """Spaces, commas and letters beyond ASCII in paths: no quoting beyond the shell's."""
    data = world / "my data, é.csv"
    shutil.copy(Path(__file__).parent.parent / "dlfs_cli" / "data" / "boston_house_prices.csv", data)
    run = "runs/my run, é"
    result = dlfs("train", *SMOKE, "figures.enabled=false", f"data.path={data.name}", f"hydra.run.dir={run}")
    assert result.code == 0, result.err
    assert json.loads((world / run / "summary.json").read_text())["status"] == "completed"
    again = dlfs("train", *SMOKE, f"hydra.run.dir={run}")
    assert again.code == 2 and "already holds a run" in again.err


def test_what_hydra_reads_itself_passes_through(world: Path, dlfs) -> None:
    """null, deletions and --info's choices are Hydra's: dlfs's own checks leave them alone."""
    shown = dlfs("train", "--cfg", "job", "data.path=null", "resume=null")
    assert shown.code == 0 and "  path: null" in shown.out and "resume: null" in shown.out
    info = dlfs("train", "--info", "defaults")
    assert info.code == 0 and "trainer/default" in info.out


def test_a_stray_rank_variable_does_not_open_the_folder(world: Path, dlfs, monkeypatch: pytest.MonkeyPatch) -> None:
    """RANK alone (clusters export it) is not torchrun: the overwrite check still holds."""
    monkeypatch.setenv("RANK", "1")
    before = snapshot(world)
    result = dlfs("train", "hydra.run.dir=run")
    assert result.code == 2 and "already holds a run" in result.err
    assert snapshot(world) == before


def test_a_refused_run_outside_the_working_folder_leaves_no_folder(
    world: Path, dlfs, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The folders made for hydra.run.dir (its parents too) go with a refusal, wherever they are."""
    outside = tmp_path_factory.mktemp("outside")
    result = dlfs("train", f"hydra.run.dir={outside}/a/b", "model.hidden_size=0")
    assert_one_line_error(result, 2, r"model.hidden_size: 0")
    assert list(outside.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_behind_stdout_is_one_line_naming_it(world: Path) -> None:
    """`dlfs runs > file` on a full disk: the listing is lost, so it is an error (exit 2), said in one line
    that names what could not be written."""
    out = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m dlfs_cli runs . > /dev/full"], cwd=world, capture_output=True, text=True
    )
    assert_one_line_error(Result(out.returncode, out.stdout, out.stderr), 2, r"cannot use <stdout>: the disk is full")
