"""Data-parallel training under torchrun (gloo on the CPU): one run folder, rank 0 writes, and two ranks
train the same model as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import run_dlfs, wait_for

from dlfs_cli.checkpoint import load_checkpoint
from dlfs_cli.config import TrainerConfig
from dlfs_cli.distributed import World
from dlfs_cli.tracking import ProgressDisplay, RunFolder
from dlfs_cli.train import train
from dlfs_cli.trainer import Interrupted, StopAgreement, Trainer

CPU = torch.device("cpu")

# dropout off: with it, each rank draws its own masks and the runs differ by design
CNN = ["model=mnist_cnn", "data=digits", "model.dropout_keep=1.0", "figures.enabled=false", "device=cpu"]


def torchrun(*args: str, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*cmd, "-m", "dlfs_cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("rows", [32, 29, 1])
def test_the_ranks_shards_make_up_the_batch(rows: int) -> None:
    batch = torch.arange(rows * 3).reshape(rows, 3)
    shards = [World(rank, 2).shard(batch) for rank in range(2)]
    assert torch.equal(torch.cat(shards), batch)
    assert abs(len(shards[0]) - len(shards[1])) <= 1


@pytest.mark.slow
def test_two_ranks_write_one_run_folder_and_train_as_one_process(make_cfg, tmp_path: Path) -> None:
    """The same global batch (trainer.batch_size) over 2 gloo ranks reaches the weights of 1 process:
    41 steps over the 1,293 training digits, the last batch of 13 rows split 7 + 6."""
    out = torchrun("train", *CNN, "trainer.epochs=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "mnist_cnn").iterdir())
    assert len(runs) == 1  # one folder for both ranks
    run = runs[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    assert {p.name for p in run.iterdir()} == {
        ".hydra", ".dlfs.lock", "config.yaml", "metrics.csv", "summary.json", "checkpoints", "train.log",
        "train.rank1.log",
    }  # fmt: skip
    assert out.stdout.count("completed:") == 1  # rank 0 speaks for the run

    single = tmp_path / "single"
    metrics = train(make_cfg(*CNN, "trainer.epochs=1"), single)
    ddp = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    one = torch.load(single / "checkpoints" / "last.pt", weights_only=True)
    assert ddp["step"] == one["step"] == 41
    assert ddp["model"].keys() == one["model"].keys()  # plain weights: no DistributedDataParallel prefix
    for name, weights in one["model"].items():
        torch.testing.assert_close(ddp["model"][name], weights, atol=1e-5, rtol=0)
    assert summary["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert summary["metrics"]["test_loss"] == pytest.approx(metrics["test_loss"], abs=1e-5)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_with_one_checkpoint_that_resumes_anywhere(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dlfs_cli"]
    cmd += ["train", *CNN, "trainer.epochs=1000", "hydra.run.dir=run"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "run" / "metrics.csv"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 3, proc)  # the ranks train
    proc.send_signal(signal.SIGTERM)  # to torchrun only, as a scheduler would: it passes it to the ranks
    _, err = proc.communicate(timeout=120)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted", err.decode()[-2000:]
    assert err.decode().count("dlfs: interrupted by SIGTERM") == 1
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert "module.conv1.weight" not in state["model"]

    # continued by one process, to the end of the next epoch
    done = summary["epochs_completed"] + 1
    out = run_dlfs("train", "resume=run", f"trainer.epochs={done}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_trainer_nproc_reruns_itself_under_torchrun(tmp_path: Path) -> None:
    out = run_dlfs("train", *CNN, "trainer.epochs=1", "trainer.nproc=2", "hydra.run.dir=run", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torchrun --standalone --nproc_per_node=2" in out.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"


def test_what_data_parallel_refuses(tmp_path: Path) -> None:
    out = run_dlfs("train", "-m", "trainer.nproc=2", "seed=1,2", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert out.returncode == 2 and "job 0 failed, job 1 failed" in out.stderr
    assert (
        "trainer.nproc > 1 runs dlfs under torchrun: not as a job of a sweep"
        in (tmp_path / "sweep/summary.csv").read_text()
    )
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    out = run_dlfs("train", "-m", "seed=1,2", cwd=tmp_path, env=env)
    assert out.returncode == 2 and "a sweep (-m) cannot run under torchrun" in out.stderr
    assert os.environ.get("WORLD_SIZE") is None


# the stop agreement under torchrun: about every half second of training, not every step -------------------


@dataclass(frozen=True)
class AgreeingPartner(World):
    """Rank 0 of two with no process group: the other rank adds nothing to the sums and agrees with
    everything (its numbers are this rank's)."""

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def max_ints(self, values: list[int]) -> list[int]:
        return values


def test_ranks_agree_on_a_stop_at_agreed_steps_and_resume_exactly(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop flag's all_reduce came after every step: a host round trip with the ranks in lock-step. Now
    at steps the ranks agree on: about every StopAgreement.AGREE_S seconds (here: longer than any step, so
    log_every steps apart) and at the epoch's end. A stop asked after step 6 stops at step 9 with last.pt,
    which resumes to the weights of the run that was never stopped. Steps slower than AGREE_S: every step."""
    batches = [(torch.randn(6, 4, generator=torch.Generator().manual_seed(i)), torch.ones(6, 1)) for i in range(10)]
    agreed_at: list[int] = []
    agree = StopAgreement.agree
    monkeypatch.setattr(
        StopAgreement, "agree", lambda self, w, step, s: agreed_at.append(step) or agree(self, w, step, s)
    )
    monkeypatch.setattr(StopAgreement, "AGREE_S", 1e9)

    def trainer(name: str, stop_after: int | None = None) -> tuple[Trainer, Batches]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        run = RunFolder(tmp_path / name, live=False)
        run.start(make_cfg(), {}, ["loss", "mse", "rmse", "mae"])
        schedule = TrainerConfig(log_every=4, checkpoint_every=0)
        t = Trainer(model, optimizer, None, schedule, "mse", CPU, run, {}, AgreeingPartner(0, 2))

        def loader():  # the signal lands after step `stop_after` (when the next batch is asked for)
            for i, batch in enumerate(batches, start=1):
                yield batch
                if i == stop_after:
                    t.stop_signal = signal.SIGTERM

        return t, Batches(loader, len(batches))

    def epoch(t: Trainer, loader: Batches) -> None:
        t._train_epoch(loader, None, ProgressDisplay(1, len(batches), live=False), 1)

    straight, loader = trainer("straight")
    epoch(straight, loader)
    assert agreed_at == [1, 5, 9, 10]  # the first step, then log_every steps apart, and the epoch's end

    agreed_at.clear()
    stopped, loader = trainer("stopped", stop_after=6)
    with pytest.raises(Interrupted, match=r"after batch 9 \(step 9\)"):
        epoch(stopped, loader)
    assert agreed_at == [1, 5, 9]
    resumed, loader = trainer("resumed")
    resumed.load_state_dict(load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt"))
    epoch(resumed, loader)
    assert resumed.step == straight.step == 10
    for name, weights in straight.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[name], weights), name

    agreed_at.clear()
    monkeypatch.setattr(StopAgreement, "AGREE_S", 0.0)  # steps slower than it: every step
    epoch(*trainer("slow"))
    assert agreed_at == list(range(1, 11))


class Batches:
    """A loader the trainer can take the length of, made anew from `make` at each pass."""

    def __init__(self, make, n: int) -> None:
        self.make, self.n = make, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(self.make())
