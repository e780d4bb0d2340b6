"""Checkpoints: plain dicts of tensors and primitives, written atomically, read with weights_only=True.

A checkpoint holds everything needed to continue a run exactly where it stopped, mid-epoch
included: the model, optimizer and scheduler states, the position (epoch, batch, step), every random
number generator that matters (torch, CUDA, numpy, Python, and the data order's), the carried LSTM
state, the running loss sums, the config and a hash of the parts that define the model and data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import torch

from dlfs_cli.config import DlfsError
from dlfs_cli.tracking import CHECKPOINT_DIR, replace_atomically

FORMAT_VERSION = 2
DEFINING = ("model", "data", "loss")  # the config sections that define what the weights mean
# keys of those sections that bound how the data are read, not what they are: out of the hash, so that a run saved
# before the key existed resumes (its saved config gets the key's default)
NOT_DEFINING = {"data": ("max_chars",)}


@dataclass
class Checkpoint:
    """What a checkpoint file holds: the one definition of its keys. Trainer.state_dict() fills one and
    Trainer.load_state_dict() reads it back; eval and generate read the weights, config and vocabulary.
    Saved as a plain dict of tensors and primitives (torch.load(weights_only=True) reads it)."""

    model: dict[str, Any]  # the plain module's weights (also from a DistributedDataParallel run)
    config: dict[str, Any] = field(default_factory=dict)  # the run's whole config, resolved
    config_hash: str | None = None  # of the sections that define the weights (config_hash below)
    dlfs_version: str | None = None
    vocab: str | None = None  # a character model's vocabulary: index i is vocab[i]
    # where the run stands, for an exact resume
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches done in the epoch under way (0 between epochs)
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # the latest val_* metrics, and test_* once measured
    best_loss: float = float("inf")  # the lowest validation loss so far (best.pt's; older runs: test loss)
    best_epoch: int | None = None  # the epoch best.pt was saved at
    evals_since_best: int = 0  # evaluations since the validation loss last improved (early stopping)
    stopped_early: dict[str, Any] | None = None  # where and why early stopping ended the run
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None  # capture_rng(): torch, CUDA, MPS, numpy, Python
    data_rng: Any = None  # the data order's generator at the start of the epoch under way
    carried: dict[str, Any] | None = None  # an LSTM's carried (h, c) and how it is carried
    sums: dict[str, Any] = field(default_factory=dict)  # the running training-loss sums (RunningLoss)
    elapsed_s: float = 0.0  # seconds of training so far
    format_version: int = FORMAT_VERSION  # 1: before exact resume (no optimizer, RNG, ... saved)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # shallow: no copy of weights

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Checkpoint:
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in state.items() if k in known}
        return cls(**fields | {"format_version": state.get("format_version", 1)})  # 1: it predates the key


def save_checkpoint(path: Path, state: Checkpoint) -> None:
    """Write atomically: a temporary file in the same folder, flushed and fsynced, then renamed over
    `path`. A failure (a full disk, say) leaves the previous checkpoint as it was."""

    def write(f: BinaryIO) -> None:
        kept = _KeepsWriteErrors(f)
        try:
            torch.save(state.to_dict(), cast(BinaryIO, kept))  # a file as far as torch.save goes
        except RuntimeError:
            # torch's writer turns the file's OSError (the disk is full) into a RuntimeError of its own, with
            # neither the reason nor the file ("unexpected pos 704 vs 598") and 100 lines of traceback
            if kept.error is not None:
                raise kept.error from None
            raise

    replace_atomically(path, write, action="could not write checkpoint", note="; the previous one is kept")


class _KeepsWriteErrors:
    """A file for torch.save that keeps the first OSError of its writes."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as ex:
            self.error = self.error or ex
            raise

    def flush(self) -> None:
        self.f.flush()


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Only tensors and plain data: a checkpoint that asks to run code is refused, and none runs."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files: the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as ex:
        lines = [line.strip() for line in str(ex).splitlines() if line.strip()]
        culprit = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), "unsupported content")
        raise DlfsError(
            f"{path} was refused: not a plain-data checkpoint, loading it would run code ({culprit[:160]})"
        ) from None
    except Exception as ex:  # noqa: BLE001 - a damaged or foreign file, whatever torch says about it
        raise DlfsError(f"{path}: cannot be read as a checkpoint ({type(ex).__name__}: {ex})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise DlfsError(f"{path} is not a dlfs checkpoint (no model weights and config in it)")
    return Checkpoint.from_dict(state)


def load_run_checkpoint(run_dir: Path, checkpoint: str, map_location: str | torch.device = "cpu") -> Checkpoint:
    """checkpoints/<checkpoint>.pt of a run folder; a missing folder, file or unreadable file is a DlfsError."""
    if not run_dir.is_dir():
        raise DlfsError(f"run={run_dir}: no such folder")
    path = run_dir / CHECKPOINT_DIR / f"{checkpoint}.pt"
    if not path.is_file():
        found = sorted(p.name for p in (run_dir / CHECKPOINT_DIR).glob("*.pt"))
        if checkpoint == "best" and "last.pt" in found:
            raise DlfsError(
                f"run={run_dir}: no {CHECKPOINT_DIR}/best.pt: it is the epoch of the lowest validation loss, and a "
                "run without a validation split (data.val_fraction=0) has none; use checkpoint=last"
            )
        raise DlfsError(
            f"run={run_dir}: no {CHECKPOINT_DIR}/{checkpoint}.pt"
            + (f" (it has {', '.join(found)})" if found else " (is it a dlfs run folder that finished an epoch?)")
        )
    return load_checkpoint(path, map_location)


def load_run_model(run_dir: Path, checkpoint: str, device: torch.device) -> tuple[torch.nn.Module, Any, Checkpoint]:
    """(the model with the checkpoint's weights, on `device`; the run's typed config; the checkpoint)."""
    from dlfs_cli.config import typed_config

    state = load_run_checkpoint(run_dir, checkpoint)
    cfg = typed_config(state.config)
    return model_of(cfg, state, run_dir / CHECKPOINT_DIR / f"{checkpoint}.pt", device), cfg, state


def model_of(cfg: Any, state: Checkpoint, path: Path, device: torch.device, info: Any = None) -> torch.nn.Module:
    """The model of a checkpoint read from `path` (`cfg`: its config, typed), with its weights, on `device`;
    sized by `info` (a DataInfo of data rebuilt for it), else by the config and checkpoint alone."""
    from dlfs_cli.models import build_model

    model = build_model(cfg.model, info if info is not None else data_info_of(cfg, state))
    load_weights(model, state.model, path)
    return model.to(device)


def data_info_of(cfg: Any, state: Checkpoint) -> Any:
    """What sizes a run's model, from its config and checkpoint alone (no data is read): Boston's 13
    features, the images' shape and classes, the text's vocabulary (saved with the weights)."""
    from dlfs_cli.data import DataInfo
    from dlfs_cli.data.boston import NUM_COLUMNS

    name = cfg.data.name
    if name == "boston":
        return DataInfo(name=name, source="", n_train=0, n_test=0, num_features=NUM_COLUMNS - 1)
    if name == "text":
        return DataInfo(name=name, source="", n_train=0, n_test=0, vocab=state.vocab)
    return DataInfo(name=name, source="", n_train=0, n_test=0, image_shape=(1, 28, 28), num_classes=10)


def load_weights(model: torch.nn.Module, weights: dict[str, Any], path: Path) -> None:
    """A checkpoint's weights into `model`; weights of another shape are a one-line DlfsError."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as ex:
        detail = next((line.strip() for line in str(ex).splitlines()[1:] if line.strip()), str(ex))
        raise DlfsError(f"{path} does not fit its model: {detail}") from None


def config_hash(config: dict[str, Any]) -> str:
    """A hash of the config sections that define the model and its data."""
    defining = {k: config.get(k) for k in DEFINING}
    for section, keys in NOT_DEFINING.items():
        values = defining.get(section)
        if isinstance(values, dict):
            defining[section] = {k: v for k, v in values.items() if k not in keys}
    return hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe(config: dict[str, Any]) -> str:
    return f"model={config['model']['name']} data={config['data']['name']}"


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """Every global random number generator's state, as tensors and plain numbers.

    CUDA's generators only once this process has used CUDA: asking earlier would start CUDA (slowly,
    and taking GPU memory) for a device=cpu run on a GPU machine, and unused generators hold nothing to
    keep. `cuda_training`: which of them trained (its index): a resume may train on another GPU index (a
    sweep's job n ran on GPU n mod k; resumed alone it takes GPU 0), and its dropout must continue from the
    generator that trained, not from that index's. The MPS generator (dropout on an Apple GPU) when
    training there."""
    numpy_state = np.random.get_state()
    assert isinstance(numpy_state, tuple)  # the global RandomState's MT19937 (a dict only for other generators)
    _, keys, pos, has_gauss, gauss = numpy_state
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "cuda_training": _gpu_index(device) if device is not None and device.type == "cuda" else None,
        "mps": torch.mps.get_rng_state() if device is not None and device.type == "mps" else None,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def _gpu_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Put back what capture_rng took. A checkpoint from a machine with more GPUs holds more CUDA states
    than this one has devices (resume runs at any process count): each GPU here takes its own, by index;
    then the GPU that trains now (`device`) takes the generator of the GPU that trained."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)
    trained_on = state.get("cuda_training")  # absent from older checkpoints
    if trained_on is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][trained_on].cpu(), device)
    if state.get("mps") is not None and torch.backends.mps.is_available():  # absent from older checkpoints
        torch.mps.set_rng_state(state["mps"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
