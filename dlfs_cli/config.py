"""Typed configuration: the dataclass schemas behind every YAML file in `conf/`.

Each group's YAML files extend one of these schemas (registered in Hydra's ConfigStore as
`schema_<group>_<name>`), so a typo'd key or a wrongly typed value fails while Hydra composes
the config, before any work starts. Value ranges are checked by `validate()`.

Every default is stated here, once, next to what it means: the YAML files in `conf/` only pick
the options (their `defaults:` lists); `experiment/` presets pin the values of a published run.
`dlfs train --cfg job` and `--help` show the composed values.
This module must not import torch: `dlfs train --cfg job` and `--help` go through it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, cast

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from dlfs_cli.errors import DlfsError


class Activation(str, Enum):
    sigmoid = "sigmoid"
    tanh = "tanh"
    relu = "relu"
    none = "none"


class Scaling(str, Enum):
    train = "train"  # StandardScaler fitted on the training rows only (no test leakage)
    all = "all"  # the book's notebook: fitted on all 506 rows before the split


class ImageScaling(str, Enum):
    auto = "auto"  # minmax for a model that reconstructs its input, standard otherwise
    standard = "standard"  # (x/255 - mean) / std: the book's Normalize((0.1305,), (0.3081,)) on MNIST
    minmax = "minmax"  # [-1, 1] by the training set's min and max: the book's autoencoder


class Batching(str, Enum):
    streams = "streams"  # the text cut into batch_size contiguous streams; each row's state carried
    book = "book"  # the notebook's overlapping windows, carrying the batch-mean state


class EvalState(str, Enum):
    zeros = "zeros"  # every held-out window starts from a zero LSTM state (a model's own measure)
    carried = "carried"  # from the state carried out of training (the book's evaluation; batching=book)


class Corpus(str, Enum):
    book = "book"  # the notebook's 99,993-character synthetic Shakespeare (DLFS_code, MIT)
    tinyshakespeare = "tinyshakespeare"  # 1,115,394 characters (karpathy/char-rnn, MIT)


class Logger(str, Enum):
    csv = "csv"  # metrics.csv only (always written)
    tensorboard = "tensorboard"  # also event files in <run>/tensorboard/ (pip install 'dlfs-cli[tensorboard]')


class Direction(str, Enum):
    auto = "auto"  # maximize a metric named *accuracy*, minimize anything else
    minimize = "minimize"
    maximize = "maximize"


class Precision(str, Enum):
    fp32 = "fp32"  # float32 throughout: the book's numbers
    bf16 = "bf16"  # forward passes under bfloat16 autocast (CPU, CUDA, MPS from torch 2.6): faster, other numbers


class Pipeline(str, Enum):
    tensor = "tensor"  # each split held whole as one uint8 tensor, scaled per batch (fast)
    torchvision = "torchvision"  # the book's PIL -> ToTensor -> Normalize through a DataLoader


# The folder that holds the datasets that are downloaded (MNIST): $DLFS_DATA_ROOT, or ~/.cache/dlfs.
DATA_ROOT = "${oc.env:DLFS_DATA_ROOT,'~/.cache/dlfs'}"


# --- model -----------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name: str = MISSING


@dataclass
class BostonModelConfig(ModelConfig):
    """The book's HousePricesModel: Dense(13 -> hidden, activation, dropout) -> Dense(hidden -> 1)."""

    name: str = "boston"
    hidden_size: int = 13
    activation: Activation = Activation.sigmoid  # sigmoid (the chapter text) | tanh (the notebook) | relu | none
    # Probability of KEEPING a unit, as the book writes it (nn.Dropout(p = 1 - dropout_keep)).
    # 1.0 means no dropout layer at all.
    dropout_keep: float = 1.0


@dataclass
class MNISTConvNetConfig(ModelConfig):
    """The book's MNIST_ConvNet: two 'same' convolutions (no pooling), then Dense -> Dense(10)."""

    name: str = "mnist_cnn"
    channels: list[int] = field(default_factory=lambda: [16, 8])  # the chapter text; the notebook: 14, 7
    filter_size: int = 5  # odd: padding filter_size // 2 keeps 28x28
    hidden_size: int = 32
    activation: Activation = Activation.tanh
    # Probability of KEEPING a unit after each layer but the last, as in the book; 1.0 = no dropout.
    dropout_keep: float = 0.8


@dataclass
class AutoencoderConfig(ModelConfig):
    """The book's Encoder -> hidden_dim code -> Decoder; forward returns (reconstruction, code)."""

    name: str = "autoencoder"
    hidden_dim: int = 28  # size of the code
    channels: list[int] = field(default_factory=lambda: [14, 7])
    filter_size: int = 5
    activation: Activation = Activation.tanh


@dataclass
class NextCharacterConfig(ModelConfig):
    """The book's NextCharacterModel: one-hot characters -> LSTM -> Dense(vocab) at every step."""

    name: str = "lstm_charmodel"
    hidden_size: int | None = 256  # the chapter text; None = the vocabulary size (the notebook)


# --- data ------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    name: str = MISSING
    # The part of the training data held back as the validation split: every decision during training
    # (best.pt, early stopping, a sweep's ranking) is taken on it, never on the test split. 0: no
    # validation split, all training data trains (the book's runs: its presets set 0).
    val_fraction: float = 0.1


@dataclass
class BostonDataConfig(DataConfig):
    name: str = "boston"
    # None = the bundled CSV; or a CSV of your own with the same 14 columns (13 features then MEDV) and a header
    path: str | None = None
    test_size: float = 0.3  # the book's train_test_split(test_size=0.3, random_state=80718)
    split_seed: int = 80718
    scaling: Scaling = Scaling.train  # train: scaler fitted on the training rows | all: the book's, on all rows
    num_workers: int = 0  # DataLoader workers; 506 rows never need more
    # of the 354 training rows, a seeded draw (split_seed) of 71 validates: 0.1 would leave 35 rows, too
    # few for a validation MSE that ranks runs (it moves by units between draws of 35 houses)
    val_fraction: float = 0.2


@dataclass
class MNISTDataConfig(DataConfig):
    name: str = "mnist"
    root: str = DATA_ROOT  # the folder that holds MNIST/raw/ (torchvision's layout)
    download: bool = True  # fetch the files through torchvision when they are missing
    # tensor: whole splits held as tensors, scaled per batch | torchvision: the book's DataLoader
    pipeline: Pipeline = Pipeline.tensor
    # auto: minmax [-1, 1] for the autoencoder, else standard (the book's mean 0.1305, std 0.3081)
    scaling: ImageScaling = ImageScaling.auto
    num_workers: int = 0  # DataLoader worker processes, pipeline=torchvision only
    # the validation images (val_fraction of the 60,000 training images) are a draw seeded by this
    split_seed: int = 0


@dataclass
class DigitsDataConfig(DataConfig):
    name: str = "digits"
    test_size: float = 0.2
    split_seed: int = 0
    # auto: minmax [-1, 1] for the autoencoder, else standard with the digits' own statistics
    scaling: ImageScaling = ImageScaling.auto


@dataclass
class TextDataConfig(DataConfig):
    name: str = "text"
    # a text bundled with dlfs: book (the notebook's 99,993 characters) | tinyshakespeare (1,115,394)
    corpus: Corpus = Corpus.book
    path: str | None = None  # any UTF-8 text file of your own instead of the corpus
    sequence_length: int = 25  # characters per row of a batch (the chapter text's 25; the notebook's 50)
    # streams: batch_size contiguous streams, each row's state carried | book: the notebook's windows
    batching: Batching = Batching.streams
    train_fraction: float = 0.8  # the first 80% of the text is the training part, the rest the test split (the book's)
    # (the validation text is the last val_fraction of the training part, just before the test text)
    # zeros: each held-out window or stream starts from a zero state | carried: from the state carried
    # out of training, the batch mean (the book's evaluation, batching=book only)
    eval_state: EvalState = EvalState.zeros
    # the longest text read (about one byte of memory a character): a larger file is refused in one line
    max_chars: int = 1_000_000_000


# --- optimizer -------------------------------------------------------------------------------


@dataclass
class OptimizerConfig:
    name: str = MISSING
    lr: float = MISSING
    weight_decay: float = 0.0


@dataclass
class SGDConfig(OptimizerConfig):
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9  # the book's SGDMomentum
    nesterov: bool = False


@dataclass
class AdamConfig(OptimizerConfig):
    name: str = "adam"
    lr: float = 0.001
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


# --- scheduler (stepped once per epoch, after the optimizer) ----------------------------------


@dataclass
class SchedulerConfig:
    name: str = MISSING


@dataclass
class ExponentialConfig(SchedulerConfig):
    """lr *= gamma each epoch; or give final_lr to decay from optimizer.lr to it over the epochs."""

    name: str = "exponential"
    gamma: float | None = None
    # from optimizer.lr in epoch 1 to final_lr in the last: gamma = (final_lr / lr) ** (1 / (epochs - 1)).
    # Not the book's code, whose gamma = (final_lr / lr) ** (1 / (epochs + 1)) is also stepped once before
    # the first epoch: its epoch 1 trains at lr * gamma and its rate never reaches final_lr.
    final_lr: float | None = None


@dataclass
class StepConfig(SchedulerConfig):
    name: str = "step"
    step_size: int = 30  # epochs between decays
    gamma: float = 0.1


@dataclass
class CosineConfig(SchedulerConfig):
    name: str = "cosine"
    t_max: int | None = None  # epochs of one half cosine; None = trainer.epochs
    eta_min: float = 0.0


# --- loss, trainer, top level ----------------------------------------------------------------


@dataclass
class LossConfig:
    name: str = MISSING  # mse | cross_entropy


@dataclass
class EarlyStoppingConfig:
    """Stop when the validation loss has not improved for `patience` evaluations (needs a validation split)."""

    patience: int | None = None  # evaluations without improvement before the run stops; None: never stop early
    min_delta: float = 0.0  # an improvement is a validation loss lower than the best by more than this


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 32  # the global batch, also over several processes
    # evaluate on the validation split every N epochs (and after the last); the test split is evaluated
    # once, after the last epoch. With data.val_fraction=0 these evaluations are of the test split (the book's)
    eval_every: int = 1
    test_every_eval: bool = False  # also evaluate the test split at every evaluation (for its curve; decides nothing)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    grad_clip_norm: float | None = None  # clip the gradients' global L2 norm to this before each step; None: off
    limit_batches: int | None = None  # at most N batches per epoch and per evaluation (quick smoke runs)
    log_every: int = 100  # training steps between rows of training loss in metrics.csv (and the loss curve)
    checkpoint_every: int = 500  # training steps between mid-epoch saves of last.pt (0: epoch ends only)
    deterministic: bool = False  # PyTorch's deterministic algorithms (slower on a GPU; recorded in summary.json)
    nproc: int = 1  # > 1: data-parallel over N processes on this machine (dlfs re-runs itself under torchrun)
    # speed switches, off by default (see README, Performance); the first changes the numbers
    precision: Precision = Precision.fp32  # fp32 | bf16 (bfloat16 autocast for the forward pass, CPU and CUDA)
    channels_last: bool = False  # convolutions in NHWC memory layout (often faster on CPUs and tensor cores)
    compile: bool = False  # torch.compile the model (compiles first: pays off on long runs)
    # CUDA only: cuDNN times its algorithms for these shapes and keeps the fastest (ignored if deterministic)
    cudnn_benchmark: bool = False
    # CUDA only (Ampere and later): TensorFloat32 in float32 matmuls and convolutions (recorded in
    # summary.json); off: true float32
    tf32: bool = False


@dataclass
class FiguresConfig:
    # PNG files in <run>/figures/ at the end of a run: loss curves; confusion matrix; autoencoder pictures
    enabled: bool = True
    tsne_points: int = 10_000  # autoencoder: test encodings in the t-SNE map (the book's 10,000; cost grows fast)
    reconstructions: int = 8  # autoencoder: originals beside their reconstructions (the book's figure 7-3)
    random_codes: int = 5  # autoencoder: uniform(-1, 1) codes through the decoder (the book's figure 7-5)


class CheckpointChoice(str, Enum):
    last = "last"  # the end of the latest epoch
    best = "best"  # the lowest validation loss (a run with data.val_fraction=0 has no best.pt)


@dataclass
class GenerateConfig:
    """`dlfs generate`: sample text from a trained lstm_charmodel run."""

    run: str = MISSING  # the run folder
    length: int = 500  # characters to generate after the prime
    temperature: float = 1.0  # < 1 sharper, > 1 more random; near 0 always takes the likeliest character
    # text to start from (its characters must be in the run's vocabulary); None = a newline (or the
    # vocabulary's first character)
    prime: str | None = None
    seed: int = 0  # the same seed gives the same text
    checkpoint: CheckpointChoice = CheckpointChoice.last  # last | best
    device: str = "cpu"  # cpu | cuda | cuda:N | mps


@dataclass
class EvalConfig:
    """`dlfs eval`: recompute a finished run's held-out metrics from one of its checkpoints."""

    run: str = MISSING  # the run folder
    checkpoint: CheckpointChoice = CheckpointChoice.last  # last | best
    device: str | None = None  # None: the device setting the run was trained with; or cpu | cuda | cuda:N | mps


@dataclass
class Reference:
    """The book's own code re-run at several seeds on this project's machines: the spread a reproduction is
    held to (tests/benchmarks/book_spread.py measures it; mean and std are checked against the values)."""

    script: str = MISSING  # the book's pipeline that was run (the project's shared bench/)
    seeds: list[int] = MISSING
    values: list[float] = MISSING  # the metric at each seed
    mean: float = MISSING
    std: float = MISSING  # sample standard deviation (n - 1)
    measured: str = MISSING  # when and where


@dataclass
class Target:
    """One number the book printed, the spread of the book's own code around it, and our presets."""

    experiment: str = MISSING  # an experiment/ preset: the book's settings
    metric: str = MISSING  # a test metric of summary.json
    book: float = MISSING  # what the book printed
    better: Direction = MISSING  # minimize | maximize: the side an improvement lies on
    reference: Reference = MISSING
    improved: str | None = None  # an experiment/ preset of ours, for the "beyond the book" table


@dataclass
class ReproduceDataConfig:
    root: str = DATA_ROOT  # holds MNIST/raw/ (downloaded there if missing), for every run


@dataclass
class ReproduceConfig:
    """`dlfs reproduce`: the book's chapter-7 numbers, re-run and compared."""

    # experiment names to run, e.g. only=[book_boston,book_lstm_charmodel]; None: every target
    only: list[str] | None = None
    # each experiment once per seed; the report gives mean +- std, and the mean must lie in the band
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps, for every run
    # tiny offline data (digits, a few batches), for tests: checks the machinery, the numbers mean nothing
    quick: bool = False
    improved: bool = True  # also run our improved presets (experiment/improved_*): the "beyond the book" table
    # the band a mean of n seeds must fall in: reference mean +- band_sigmas * std * sqrt(1/n + 1/n_reference),
    # the spread of a mean of n runs of the book's code around the reference's own (uncertain) mean
    band_sigmas: float = 3.0
    data: ReproduceDataConfig = field(default_factory=ReproduceDataConfig)
    targets: list[Target] = field(default_factory=list)
    quick_overrides: dict[str, list[str]] = field(default_factory=dict)  # per experiment, for quick=true


LOSSES = ("mse", "cross_entropy")
# The loss each of the book's models trains with: numbers against numbers (a regression, a reconstruction)
# or class scores against class labels. The other pairing trained on nonsense: model=boston with
# loss=cross_entropy "completed" with a loss of 0 (one output column: one class), model=mnist_cnn with
# loss=mse was a shape traceback.
MODEL_LOSS = {"boston": "mse", "autoencoder": "mse", "mnist_cnn": "cross_entropy", "lstm_charmodel": "cross_entropy"}
LOSS_MEANS = {"mse": "its outputs are numbers to match", "cross_entropy": "its outputs are scores of classes"}
# What an evaluation reports, per split (val_*, test_*): the loss's own metrics; a model of characters also bpc
REGRESSION_METRICS = ["loss", "mse", "rmse", "mae"]
CLASSIFICATION_METRICS = ["loss", "accuracy"]
SEQUENCE_METRICS = ["loss", "bpc", "accuracy"]  # next-character prediction: loss in nats, bpc in bits
SEQUENCE_DATA = ("text",)  # the data whose targets are sequences of characters


def metric_names(loss_name: str, sequence: bool = False) -> list[str]:
    if loss_name == "mse":
        return REGRESSION_METRICS
    return SEQUENCE_METRICS if sequence else CLASSIFICATION_METRICS


def reported_metrics(cfg: DictConfig) -> list[str]:
    """The metrics a run of `cfg` puts in summary.json: val_* with a validation split, then test_*."""
    names = metric_names(cfg.loss.name, sequence=cfg.data.name in SEQUENCE_DATA)
    splits = ["val", "test"] if cfg.data.val_fraction > 0 else ["test"]
    return [f"{split}_{name}" for split in splits for name in names]


def check_sweep_metric(cfg: DictConfig) -> None:
    """-m: sweep.metric must be a metric the job reports, or the sweep cannot rank it (and an Optuna trial fails)."""
    metric, known = str(cfg.sweep.metric), reported_metrics(cfg)
    if metric in known:
        return
    why = ""
    if metric.startswith("val_") and cfg.data.val_fraction == 0:
        why = (
            " (data.val_fraction=0, as in the book's presets: no validation split; "
            "set data.val_fraction=0.1 or rank on test_*)"
        )
    raise DlfsError(
        f"sweep.metric={metric} is not a metric of model={cfg.model.name} with loss={cfg.loss.name}{why}; "
        f"it reports: {', '.join(known)}"
    )


FIGURE_ROW_MAX = 100  # images in a row of the autoencoder's figures (the book's: 8 and 5)
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class SweepConfig:
    """How `dlfs train -m` ranks its jobs in the sweep's summary.csv and table."""

    # any metric in the jobs' summary.json: val_loss, val_accuracy, val_mse, ... (rank on the validation split;
    # test_* ranks on the data that is then reported as unseen)
    metric: str = "val_loss"
    direction: Direction = Direction.auto  # auto (maximize *accuracy*, minimize the rest) | minimize | maximize


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    loss: LossConfig = MISSING
    trainer: TrainerConfig = MISSING
    figures: FiguresConfig = field(default_factory=FiguresConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)  # dlfs train -m: how the jobs are ranked
    # every random draw of a run: initial weights, data order, dropout (dlfs train -m seed=1,2,3)
    seed: int = 0
    logger: Logger = Logger.csv  # csv: metrics.csv | tensorboard: also event files in <run>/tensorboard/
    # print the composed config as a tree before training (it is in the run's config.yaml either way;
    # dlfs train --cfg job shows it without training)
    verbose: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # a run folder: continue it from its checkpoints/last.pt, with its own config (dlfs train resume=PATH)
    resume: str | None = None


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {
        "boston": BostonModelConfig,
        "mnist_cnn": MNISTConvNetConfig,
        "autoencoder": AutoencoderConfig,
        "lstm_charmodel": NextCharacterConfig,
    },
    "data": {"boston": BostonDataConfig, "mnist": MNISTDataConfig, "digits": DigitsDataConfig, "text": TextDataConfig},
    "optimizer": {"sgd": SGDConfig, "adam": AdamConfig},
    "scheduler": {
        "none": SchedulerConfig,
        "exponential": ExponentialConfig,
        "step": StepConfig,
        "cosine": CosineConfig,
    },
    "loss": {"loss": LossConfig},
    "trainer": {"trainer": TrainerConfig},
}


def register_configs() -> None:
    """Store the schemas so that `conf/<group>/<x>.yaml` can extend `/schema_<group>_<name>`.

    They live outside the user-facing groups, so `dlfs train --help` lists only real options."""
    cs = ConfigStore.instance()
    cs.store(name="schema_train", node=TrainConfig)
    cs.store(name="schema_eval", node=EvalConfig)
    cs.store(name="schema_generate", node=GenerateConfig)
    cs.store(name="schema_reproduce", node=ReproduceConfig)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(name=f"schema_{group}_{name}", node=node)
    _own_the_optuna_preset()


def _own_the_optuna_preset() -> None:
    """Make conf/hydra/sweeper/optuna.yaml what hydra/sweeper=optuna selects. hydra-optuna-sweeper stores a
    config of the same name, with a defaults list, and Hydra refuses a file that has such a twin ("validated
    against ConfigStore schema with the same name"). The plugin stores it when Hydra scans its plugins, once
    per process: so the scan is done here, and the plugin's entry removed after it (its samplers,
    hydra/sweeper/sampler, stay); dlfs's own sweeper class is registered. Nothing is done when the plugin is
    not installed."""
    if not optuna_plugin():
        return
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()  # the scan (~50 ms), which every Hydra command does once anyway
    ConfigStore.instance().repo.get("hydra", {}).get("sweeper", {}).pop("optuna.yaml", None)
    # dlfs's sweeper (dlfs_cli/hydra_plugin): the scan walks hydra_plugins' folders, and misses a package that
    # an editable install maps there from this checkout
    from hydra_plugins.dlfs_optuna_sweeper import DlfsOptunaSweeper

    plugins.class_name_to_class[f"{DlfsOptunaSweeper.__module__}.{DlfsOptunaSweeper.__name__}"] = DlfsOptunaSweeper
    # the study's sqlite storage: alembic >= 1.18 logs a line per plugin it sets up, at INFO (dlfs's level)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def optuna_plugin() -> bool:
    """Whether hydra-optuna-sweeper is installed (the optuna extra)."""
    import importlib.util

    try:
        return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ImportError:
        return False


def conf_dir() -> Path:
    """The config folder: packaged inside an installed wheel, or the checkout's top-level conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise DlfsError(f"dlfs configuration not found (looked in {here / 'conf'} and {here.parent / 'conf'})")


# --- value checks ----------------------------------------------------------------------------


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise DlfsError(f"invalid value for {key}: {value!r} ({rule})")


def _upgrade(plain: dict[str, Any]) -> dict[str, Any]:
    """A config saved by an older dlfs, in today's keys. Its `trainer.seed` (`${seed}` by default, but
    settable on its own) is the seed that run used for everything: it becomes the top-level `seed`. A
    config from before the validation split trained on all its training data: data.val_fraction 0."""
    data = plain.get("data")
    if isinstance(data, dict) and "val_fraction" not in data:
        plain = {**plain, "data": {**data, "val_fraction": 0.0}}
    trainer = plain.get("trainer")
    if isinstance(trainer, dict) and "seed" in trainer:
        trainer = dict(trainer)
        used = trainer.pop("seed")
        plain = {**plain, "trainer": trainer}
        if isinstance(used, int) or "seed" not in plain:  # a saved config is resolved: an int
            plain["seed"] = used
    return plain


def absolute_data_paths(cfg: DictConfig) -> None:
    """A new run's data.path and data.root as absolute paths (~ expanded), in the config it saves: saved as
    typed, a relative one named another file from another folder, and dlfs eval, resume= and from= there
    said it did not exist."""
    for key in ("path", "root"):
        value = cfg.data.get(key)
        if value:
            cfg.data[key] = str(Path(os.path.expanduser(str(value))).absolute())


def load_saved_config(path: Path) -> DictConfig:
    """A run's config.yaml, typed (`typed_config`); one that cannot be read, or is not a config: DlfsError
    naming the file."""
    import yaml

    try:
        loaded = OmegaConf.load(path)
    except (OSError, ValueError, yaml.YAMLError) as ex:  # ValueError: UnicodeDecodeError, OmegaConf's own
        raise DlfsError(f"cannot read {path}: {' '.join(str(ex).split())[:160]}") from None
    if not isinstance(loaded, DictConfig):
        raise DlfsError(f"{path} is not a dlfs config (a YAML list, not a mapping of keys)")
    return typed_config(loaded)


def typed_config(saved: Any) -> DictConfig:
    """A saved config (a run's config.yaml, a checkpoint's) typed and checked against the schemas again;
    keys added to the schemas since it was saved take their defaults."""
    # a DictConfig's container is a dict, keyed by the config's names
    plain = cast(dict[str, Any], OmegaConf.to_container(saved)) if isinstance(saved, DictConfig) else dict(saved)
    plain = _upgrade(plain)
    fixed = {"loss": "loss", "trainer": "trainer"}  # groups with one schema
    try:
        typed = {}
        for group, schemas in SCHEMAS.items():
            node = plain.get(group) or {}
            name = fixed.get(group, node.get("name"))
            if name not in schemas:
                raise DlfsError(f"the saved config has no known {group} (name {name!r}; known: {', '.join(schemas)})")
            typed[group] = OmegaConf.merge(OmegaConf.structured(schemas[name]), node)
        rest = {k: v for k, v in plain.items() if k not in SCHEMAS}
        # merged into a structured dataclass config: a DictConfig
        return cast(DictConfig, OmegaConf.merge(OmegaConf.structured(TrainConfig), typed, rest))
    except (ValueError, KeyError, AttributeError, TypeError) as ex:  # OmegaConf's validation errors derive from these
        raise DlfsError(f"the saved config does not fit this dlfs version: {str(ex).splitlines()[0]}") from None


def check_device(device: str) -> None:
    _check(DEVICE_PATTERN.fullmatch(device) is not None, "device", device, "choose from: auto, cpu, cuda, cuda:N, mps")


def reject_unknown_keys(node: Any, prefix: str = "") -> None:
    """Keys added with `+key=value` that no schema declares would be silently ignored: refuse them."""
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = {f.name for f in dataclasses.fields(schema)}
        for key in node.keys():
            if key not in known:
                raise DlfsError(f"unknown key '{prefix}{key!s}' (valid keys: {', '.join(sorted(known))})")
    for key in node.keys():
        reject_unknown_keys(node._get_node(key), f"{prefix}{key!s}.")


INT64 = 2**63 - 1
SEED_MAX = 2**32 - 1  # numpy's legacy seeding takes 0 .. 2**32 - 1
SIZE_MAX = 2**31 - 1  # batch sizes, layer sizes, lengths: a count of rows or units


def check_numbers(node: Any, prefix: str = "") -> None:
    """No infinity or NaN where a number is meant, no integer beyond 64 bits (torch's and numpy's limit)."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            # is_interpolation's key is annotated int | str, but like is_missing it takes any DictConfig key
            if not OmegaConf.is_missing(node, key) and not OmegaConf.is_interpolation(node, key):  # type: ignore[arg-type]
                check_numbers(node[key], f"{prefix}{key!s}.")
        return
    if OmegaConf.is_list(node):
        for i, item in enumerate(node):
            check_numbers(item, f"{prefix}{i}.")
        return
    key = prefix.rstrip(".")
    if isinstance(node, float) and not math.isfinite(node):
        raise DlfsError(f"invalid value for {key}: {node} (must be a finite number)")
    if isinstance(node, int) and not isinstance(node, bool) and not -INT64 <= node <= INT64:
        raise DlfsError(f"invalid value for {key}: {node} (beyond the 64-bit integers)")


def check_seed(key: str, value: int) -> None:
    _check(0 <= value <= SEED_MAX, key, value, f"a seed is between 0 and {SEED_MAX}")


def check_train_keys(cfg: DictConfig) -> None:
    """Every key of a train config is there: ~verbose and ~sweep, keys deleted on the command line, were read
    only once the run's folder was made, or after it had trained."""
    for name in TRAIN_KEYS:
        if name not in cfg:
            raise DlfsError(f"~{name}: dlfs train needs {name}; set it (e.g. {name}=...) instead of deleting it")


def validate(cfg: DictConfig) -> None:
    """Check value ranges that types cannot express; raises DlfsError naming the key."""
    reject_unknown_keys(cfg)
    check_train_keys(cfg)
    check_numbers(cfg)
    check_seed("seed", cfg.seed)
    t = cfg.trainer
    _check(t.batch_size <= SIZE_MAX, "trainer.batch_size", t.batch_size, f"must be <= {SIZE_MAX}")
    _check(t.epochs >= 0, "trainer.epochs", t.epochs, "must be >= 0")
    _check(t.batch_size >= 1, "trainer.batch_size", t.batch_size, "must be >= 1")
    _check(t.eval_every >= 1, "trainer.eval_every", t.eval_every, "must be >= 1")
    _check(t.log_every >= 1, "trainer.log_every", t.log_every, "must be >= 1")
    _check(t.checkpoint_every >= 0, "trainer.checkpoint_every", t.checkpoint_every, "must be >= 0 (0: epoch ends only)")
    _check(t.nproc >= 1, "trainer.nproc", t.nproc, "must be >= 1")
    if t.limit_batches is not None:
        _check(t.limit_batches >= 1, "trainer.limit_batches", t.limit_batches, "must be >= 1 or null")

    o = cfg.optimizer
    _check(o.lr > 0, "optimizer.lr", o.lr, "must be > 0")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")
    if o.name == "sgd":
        _check(o.momentum >= 0, "optimizer.momentum", o.momentum, "must be >= 0")
        _check(not o.nesterov or o.momentum > 0, "optimizer.nesterov", o.nesterov, "needs momentum > 0")
    if o.name == "adam":
        _check(
            len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
            "optimizer.betas",
            list(o.betas),
            "two numbers in [0, 1)",
        )

    s = cfg.scheduler
    if s.name == "exponential":
        _check(
            (s.gamma is None) != (s.final_lr is None),
            "scheduler",
            {"gamma": s.gamma, "final_lr": s.final_lr},
            "set exactly one of gamma, final_lr",
        )
        if s.gamma is not None:
            _check(s.gamma > 0, "scheduler.gamma", s.gamma, "must be > 0")
        if s.final_lr is not None:
            _check(s.final_lr > 0, "scheduler.final_lr", s.final_lr, "must be > 0")
    if s.name == "step":
        _check(s.step_size >= 1, "scheduler.step_size", s.step_size, "must be >= 1")
        _check(s.gamma > 0, "scheduler.gamma", s.gamma, "must be > 0")
    if s.name == "cosine" and s.t_max is not None:
        _check(s.t_max >= 1, "scheduler.t_max", s.t_max, "must be >= 1 or null")

    _check(cfg.loss.name in LOSSES, "loss.name", cfg.loss.name, f"choose from: {', '.join(LOSSES)}")
    fit = MODEL_LOSS.get(cfg.model.name)
    if fit is not None and cfg.loss.name != fit:
        raise DlfsError(f"loss={cfg.loss.name} does not fit model={cfg.model.name}: {LOSS_MEANS[fit]}; use loss={fit}")
    check_device(cfg.device)

    m = cfg.model
    for key in ("hidden_size", "hidden_dim"):
        if m.get(key) is not None:
            _check(1 <= m[key] <= SIZE_MAX, f"model.{key}", m[key], f"must be between 1 and {SIZE_MAX}")
    if "dropout_keep" in m:
        _check(0 < m.dropout_keep <= 1, "model.dropout_keep", m.dropout_keep, "keep probability in (0, 1]")
    if "channels" in m:
        _check(
            len(m.channels) == 2 and all(1 <= c <= SIZE_MAX for c in m.channels),
            "model.channels",
            list(m.channels),
            "two channel counts >= 1",
        )
    if "filter_size" in m:
        _check(
            m.filter_size >= 1 and m.filter_size % 2 == 1,
            "model.filter_size",
            m.filter_size,
            "an odd number >= 1 (padding filter_size // 2 keeps the image size)",
        )

    d = cfg.data
    if "test_size" in d:
        _check(0 < d.test_size < 1, "data.test_size", d.test_size, "a fraction in (0, 1)")
    if "sequence_length" in d:
        _check(
            1 <= d.sequence_length <= SIZE_MAX, "data.sequence_length", d.sequence_length, f"between 1 and {SIZE_MAX}"
        )
        _check(0 < d.train_fraction < 1, "data.train_fraction", d.train_fraction, "a fraction in (0, 1)")
        _check(d.max_chars >= 1, "data.max_chars", d.max_chars, "must be >= 1")
    if "num_workers" in d:
        _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(0 <= d.val_fraction < 1, "data.val_fraction", d.val_fraction, "a fraction in [0, 1) (0: no validation)")
    if d.get("eval_state") == EvalState.carried:
        _check(
            d.batching == Batching.book,
            "data.eval_state",
            "carried",
            "the book's evaluation from its batch-mean training state needs data.batching=book",
        )
    stopping = t.early_stopping
    if stopping.patience is not None:
        _check(stopping.patience >= 1, "trainer.early_stopping.patience", stopping.patience, "must be >= 1 or null")
        _check(
            d.val_fraction > 0,
            "trainer.early_stopping.patience",
            stopping.patience,
            "stops on the validation loss: needs data.val_fraction > 0 (stopping on the test split would tune on it)",
        )
    _check(stopping.min_delta >= 0, "trainer.early_stopping.min_delta", stopping.min_delta, "must be >= 0")
    if t.grad_clip_norm is not None:
        _check(t.grad_clip_norm > 0, "trainer.grad_clip_norm", t.grad_clip_norm, "must be > 0 or null")

    f = cfg.figures
    for key in ("tsne_points", "reconstructions", "random_codes"):
        _check(f[key] >= 0, f"figures.{key}", f[key], "must be >= 0")
    for key in ("reconstructions", "random_codes"):  # one row of images each: 100000 took 10 minutes and 12 GB
        _check(f[key] <= FIGURE_ROW_MAX, f"figures.{key}", f[key], f"one row of a figure: at most {FIGURE_ROW_MAX}")
    if d.get("split_seed") is not None:
        check_seed("data.split_seed", d.split_seed)
    # every other count (steps, epochs, workers, processes, points): 2**31 - 1 at most, like the sizes above
    counts = {f"trainer.{k}": t[k] for k in ("epochs", "eval_every", "log_every", "checkpoint_every", "nproc")}
    counts |= {"trainer.limit_batches": t.limit_batches, "trainer.early_stopping.patience": stopping.patience}
    counts |= {f"figures.{k}": f[k] for k in ("tsne_points", "reconstructions", "random_codes")}
    counts |= {f"data.{k}": d[k] for k in ("num_workers",) if k in d}
    for key, value in counts.items():
        if value is not None:
            _check(value <= SIZE_MAX, key, value, f"must be <= {SIZE_MAX}")
