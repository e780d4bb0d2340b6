"""Every config option composes and validates; bad values are refused with the key named."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from omegaconf import MISSING, OmegaConf

from dlfs_cli.config import SCHEMAS, Activation, DlfsError, Scaling, TrainConfig, conf_dir, typed_config, validate

CONF = conf_dir()
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
# Options that need one more value to be complete (an exponential schedule needs gamma or final_lr).
# loss=cross_entropy is the classifiers' loss (config.MODEL_LOSS): the default model is a regression.
COMPLETE = {("scheduler", "exponential"): ["scheduler.gamma=0.9"], ("loss", "cross_entropy"): ["model=mnist_cnn"]}


def test_groups_mirror_the_schemas() -> None:
    assert set(GROUPS) == set(SCHEMAS) | {"experiment"}
    top_level = {"device", "figures", "resume", "seed", "logger", "sweep", "verbose"}
    assert {f.name for f in dataclasses.fields(TrainConfig)} == set(SCHEMAS) | top_level


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(make_cfg, group: str, option: str) -> None:
    cfg = make_cfg(f"{group}={option}", *COMPLETE.get((group, option), []))
    validate(cfg)
    if group != "experiment":
        node = cfg[group]
        # typed: the node carries its dataclass schema, so a typo in the YAML would have failed
        assert dataclasses.is_dataclass(OmegaConf.get_type(node))


def test_default_is_the_boston_model_with_its_own_data_and_loss(make_cfg) -> None:
    cfg = make_cfg()
    assert (cfg.model.name, cfg.data.name, cfg.loss.name) == ("boston", "boston", "mse")
    assert cfg.device == "auto"
    assert cfg.model.activation == Activation.sigmoid  # the chapter text's choice


def test_model_alone_picks_data_and_loss_and_a_loss_that_does_not_fit_is_refused(make_cfg) -> None:
    assert make_cfg("model=boston").loss.name == "mse"
    assert make_cfg("model=mnist_cnn").loss.name == "cross_entropy"
    with pytest.raises(DlfsError, match=r"^loss=cross_entropy does not fit model=boston: .*; use loss=mse$"):
        validate(make_cfg("model=boston", "loss=cross_entropy"))


def test_book_boston_preset_holds_the_books_settings(make_cfg) -> None:
    cfg = make_cfg("experiment=book_boston")
    assert cfg.model.hidden_size == 13 and cfg.model.activation == Activation.tanh
    assert cfg.model.dropout_keep == 0.8
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum) == ("sgd", 0.001, 0.9)
    assert (cfg.trainer.batch_size, cfg.trainer.epochs) == (32, 100)
    assert (cfg.data.test_size, cfg.data.split_seed, cfg.data.scaling) == (0.3, 80718, Scaling.all)
    # an override on top of a preset still wins
    assert make_cfg("experiment=book_boston", "trainer.epochs=3").trainer.epochs == 3


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_spellings(make_cfg, device: str) -> None:
    validate(make_cfg(f"device={device}"))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["trainer.epochs=-1"], "trainer.epochs"),
        (["trainer.batch_size=0"], "trainer.batch_size"),
        (["trainer.eval_every=0"], "trainer.eval_every"),
        (["trainer.limit_batches=0"], "trainer.limit_batches"),
        (["optimizer.lr=-0.1"], "optimizer.lr"),
        (["optimizer.lr=0"], "optimizer.lr"),
        (["optimizer.momentum=-1"], "optimizer.momentum"),
        (["optimizer.momentum=0", "optimizer.nesterov=true"], "optimizer.nesterov"),
        (["optimizer=adam", "optimizer.betas=[0.9,1.5]"], "optimizer.betas"),
        (["optimizer.weight_decay=-1"], "optimizer.weight_decay"),
        (["model.dropout_keep=0"], "model.dropout_keep"),
        (["model.dropout_keep=1.5"], "model.dropout_keep"),
        (["model.hidden_size=0"], "model.hidden_size"),
        (["data.test_size=1.0"], "data.test_size"),
        (["scheduler=exponential"], "scheduler"),
        (["scheduler=exponential", "scheduler.gamma=0.9", "scheduler.final_lr=0.001"], "scheduler"),
        (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size"),
        (["device=gpu"], "device"),
        (["device=cuda:x"], "device"),
        (["+trainer.patience=3"], "trainer.patience"),
        (["data.val_fraction=1"], "data.val_fraction"),
        (["data.val_fraction=-0.1"], "data.val_fraction"),
        (["trainer.early_stopping.patience=0"], "trainer.early_stopping.patience"),
        (["trainer.early_stopping.patience=2", "data.val_fraction=0"], "trainer.early_stopping.patience"),
        (["trainer.early_stopping.min_delta=-1"], "trainer.early_stopping.min_delta"),
        (["trainer.grad_clip_norm=0"], "trainer.grad_clip_norm"),
        (["model=lstm_charmodel", "data.eval_state=carried"], "data.eval_state"),  # streams: no mean state
    ],
)
def test_bad_values_are_refused_naming_the_key(make_cfg, overrides: list[str], key: str) -> None:
    with pytest.raises(DlfsError, match=key.replace(".", r"\.")):
        validate(make_cfg(*overrides))


def test_a_config_saved_with_the_old_trainer_seed_still_loads(make_cfg) -> None:
    """dlfs once had `trainer.seed` (= `${seed}` unless set apart), and it seeded the run: a saved
    config with it loads, its value as the one `seed`."""
    saved = OmegaConf.to_container(make_cfg("seed=5"), resolve=True, enum_to_str=True)
    assert "seed" not in saved["trainer"]
    for top, old, expected in ((5, 5, 5), (0, 7, 7), (None, 9, 9)):
        config = {**saved, "trainer": {**saved["trainer"], "seed": old}}
        if top is None:
            del config["seed"]
        else:
            config["seed"] = top
        cfg = typed_config(config)
        assert cfg.seed == expected and "seed" not in cfg.trainer
        validate(cfg)
    assert typed_config(saved).seed == 5


def test_a_config_saved_before_the_validation_split_keeps_all_its_training_data(make_cfg) -> None:
    """Such a run trained on the whole training part: its config reads as data.val_fraction=0 (its eval and
    resume see the data it saw), while a config of today keeps its own value."""
    saved = OmegaConf.to_container(make_cfg(), resolve=True, enum_to_str=True)
    assert typed_config(saved).data.val_fraction == 0.2
    del saved["data"]["val_fraction"]
    assert typed_config(saved).data.val_fraction == 0


def test_every_default_is_stated_once_in_the_schemas() -> None:
    """Group files pick their options (a `defaults:` list) and state no value: the dataclasses hold every
    default. A `name` names an option that has no dataclass of its own (loss=mse, scheduler=none)."""
    for group, option in OPTIONS:
        if group == "experiment":  # presets pin the values of a published run on purpose
            continue
        data = yaml.safe_load((CONF / group / f"{option}.yaml").read_text())
        schema = SCHEMAS[group].get(option) or next(iter(SCHEMAS[group].values()))
        names = {f.name: f.default for f in dataclasses.fields(schema)}
        identity = {"name"} if names.get("name") == MISSING else set()
        assert set(data) - {"defaults"} <= identity, f"{group}/{option}.yaml restates {set(data) - {'defaults'}}"
    for top in ("train", "eval", "generate", "reproduce"):  # run: ??? and the reproduction's data only
        data = yaml.safe_load((CONF / f"{top}.yaml").read_text())
        assert set(data) <= {"defaults", "hydra", "run", "targets", "quick_overrides"}, top
