"""The wheel carries the configs and the data: dlfs works installed, from a folder outside the repo."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_trains_from_an_empty_folder(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("dlfs_cli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dlfs_cli/conf/train.yaml" in names and "dlfs_cli/conf/model/boston.yaml" in names
    assert "dlfs_cli/data/boston_house_prices.csv" in names
    corpora = {"dlfs_book_input.txt.gz", "tinyshakespeare.txt.gz"}
    assert {f"dlfs_cli/data/corpora/{name}" for name in corpora} <= set(names)
    # hydra/sweeper=optuna's class, in Hydra's namespace package (which must have no __init__.py of its own)
    assert "hydra_plugins/dlfs_optuna_sweeper/__init__.py" in names and "hydra_plugins/__init__.py" not in names

    site = tmp_path / "site"  # a wheel is a zip: unpacked, it is the installed package
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    script = """
from hydra.core.plugins import Plugins
found = "hydra_plugins.dlfs_optuna_sweeper.DlfsOptunaSweeper" in Plugins.instance().class_name_to_class
print("SWEEPER", found)
import dlfs_cli, dlfs_cli.config
print("FILE", dlfs_cli.__file__)
print("CONF", dlfs_cli.config.conf_dir())
from dlfs_cli.cli import main
main(["train", "trainer.epochs=1"])
"""
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the editable install of the checkout
    out = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None:  # the optuna extra
        assert "SWEEPER True" in out.stdout  # Hydra's own scan finds it installed
    assert f"FILE {site}" in out.stdout and f"CONF {site / 'dlfs_cli' / 'conf'}" in out.stdout
    (run,) = (work / "outputs" / "boston").iterdir()
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
