"""hydra/sweeper=optuna's sweeper class (conf/hydra/sweeper/optuna.yaml). Hydra takes a sweeper only from its
`hydra_plugins` namespace package, so pyproject.toml ships this folder as hydra_plugins.dlfs_optuna_sweeper.
Hydra imports every module of that package at each start: this one stays small and needs nothing that the
optuna extra is not installed with; the sweeper itself is dlfs_cli.optuna_study.FolderStudy."""

from __future__ import annotations

from typing import Any

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # no optuna extra: hydra/sweeper=optuna says what to install (dlfs_cli.sweep)
    pass
else:

    class DlfsOptunaSweeper(OptunaSweeper):
        """hydra-optuna-sweeper's sweeper with its study kept in the sweep folder (dlfs_cli.optuna_study)."""

        def __init__(self, **settings: Any) -> None:
            from dlfs_cli.optuna_study import FolderStudy

            self.sweeper = FolderStudy(**settings)
