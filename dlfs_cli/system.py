"""What dlfs takes from the system it runs on: the operating system, and the outputs folder of $DLFS_OUTPUTS.

The operating systems dlfs runs on: POSIX ones. Linux is where it is tested; macOS has the same calls
(flock, fork, SIGHUP) and Apple's MPS paths are tested with a faked MPS, but dlfs has not run on a Mac.

Native Windows is refused in one line: the run lock is an flock (fcntl), a stop is a SIGTERM or SIGHUP
handled at a safe point (Windows delivers neither: a terminated process is killed outright), and forked
DataLoader workers close the lock's descriptor (os.register_at_fork). The modules that use these guard
their imports, so that `dlfs` can start there and say this instead of a traceback. WSL 2 is Linux.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dlfs_cli.errors import DlfsError

OUTPUTS_ENV = "DLFS_OUTPUTS"  # where runs go (conf/train.yaml and conf/reproduce.yaml read it too)
STAMP_ENV = "DLFS_RUN_STAMP"  # a run folder's name under torchrun, rank 0's timestamp (conf/train.yaml)
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")  # set by torchrun for each rank


def check_system() -> None:
    if sys.platform == "win32":
        raise DlfsError(
            "Windows is not supported: dlfs needs Linux (or macOS, untested) for its run locks and stop "
            "signals; run it inside WSL 2 (wsl --install), where it is Linux"
        )


def outputs_root() -> Path:
    """$DLFS_OUTPUTS, or outputs/ where it is unset. Set but empty it is refused: the configs' `${oc.env:...}`
    made runs of `/<model>/<time>` of it, at the file system's root."""
    value = os.environ.get(OUTPUTS_ENV)
    if value is not None and not value.strip():
        raise DlfsError(f"{OUTPUTS_ENV} is empty: unset it (runs go to outputs/) or name a folder in it")
    return Path(value if value is not None else "outputs")


def check_run_environment() -> None:
    """What a command that writes runs takes from the environment, checked before anything is written: the
    outputs folder, the run folder's name (an empty DLFS_RUN_STAMP made the model's folder itself the run, and
    `../..` put it outside the outputs), and torchrun's numbers (a malformed one was a ValueError traceback)."""
    outputs_root()
    stamp = os.environ.get(STAMP_ENV)
    if stamp is not None and (not stamp.strip() or stamp in (".", "..") or "/" in stamp or os.sep in stamp):
        raise DlfsError(f"{STAMP_ENV}={stamp!r}: a run folder's name (torchrun's ranks share it); unset it")
    numbers: dict[str, int] = {}
    for name in TORCHRUN_ENV:  # RANK and LOCAL_RANK alone mean nothing (runlock.torchrun_rank): WORLD_SIZE first
        value = os.environ.get(name)
        if value is not None and (name == "WORLD_SIZE" or numbers.get("WORLD_SIZE", 1) > 1):
            if not (value.strip().isascii() and value.strip().isdecimal()):
                raise DlfsError(f"{name}={value!r}: torchrun sets it to a number; unset it outside torchrun")
            numbers[name] = int(value)
    if numbers.get("WORLD_SIZE", 1) > 1 and "RANK" not in numbers:
        raise DlfsError(f"WORLD_SIZE={numbers['WORLD_SIZE']} without RANK: run it under torchrun, or unset WORLD_SIZE")
    if "RANK" in numbers and numbers["RANK"] >= numbers.get("WORLD_SIZE", 1) > 1:
        raise DlfsError(f"RANK={numbers['RANK']} is not below WORLD_SIZE={numbers['WORLD_SIZE']}")
