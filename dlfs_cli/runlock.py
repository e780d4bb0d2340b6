"""One writer per run folder, and no run ever written over another.

The process that writes a run (or a sweep, or a reproduction) holds an exclusive `flock` on
`<folder>/.dlfs.lock` for as long as it writes there. The kernel drops the lock when the process
ends, however it ends, so a SIGKILLed run can be resumed at once: there is no stale lock to clear.
The file also says who holds it (PID, host, command, since when), for the refusal's one line.

`RunDirGuard` is a Hydra callback (conf/train.yaml, conf/reproduce.yaml). It checks the *resolved*
output folder after composition, whatever the spelling that chose it (quotes, `++`, interpolations,
environment variables), before Hydra writes a file there: a folder that exists and is not empty is
refused, unless it is the run that `resume=` continues.

No torch here: the check runs before a run's ~2 s of imports.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlfs_cli.errors import DlfsError, os_error_message

if sys.platform != "win32":  # native Windows has no flock; dlfs refuses it in one line (system.py)
    import fcntl

LOCK_FILE = ".dlfs.lock"
# trainer.nproc=N: the parent holds the run's lock and hands the folder to the ranks it starts
PARENT_ENV = "DLFS_PARENT_RUN_DIR"
# What a refused run may remove: only what Hydra and this module put into a folder they made.
OWN_FILES = frozenset({".hydra", LOCK_FILE, "multirun.yaml"})
OUTPUT_SUBDIRS: set[str] = set()  # hydra.output_subdir's first part where not .hydra: Hydra's files there too

_held: dict[Path, int] = {}  # resolved folder -> the open lock file (closing it releases the lock)
# resolved folders this process created for a run or sweep, each with the highest folder that mkdir made for
# it (its own or an ancestor): a refusal removes them, up to that one
MADE: dict[Path, Path] = {}
CONTINUED: set[Path] = set()  # resolved sweep folders whose sweep this process continues (an Optuna study's resume)


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) shares the parent's lock: it closes its copies (never unlocks:
    that would release the parent's lock), so the lock dies with the parent, not with its last worker."""
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):  # not on Windows (system.py)
    os.register_at_fork(after_in_child=_forget_in_child)


class Busy(DlfsError):
    """The folder is being written by another process (`who`: its PID, host, since, command)."""

    def __init__(self, message: str, who: str = "") -> None:
        super().__init__(message)
        self.who = who


def acquire(folder: Path) -> None:
    """Take the folder's lock for this process (again: a no-op); Busy names the process that holds it."""
    key = folder.resolve()
    if key in _held:
        return
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    if not _try_lock(fd):
        who = _describe(_read(fd))
        os.close(fd)
        raise Busy(
            f"{folder} is being written by another dlfs process ({who}); refusing to write there too", who
        ) from None
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _held[key] = fd


def writing() -> Path | None:
    """The folder this process took last (the run or sweep it writes), or None."""
    return next(reversed(_held), None)


def torchrun_rank() -> int:
    """This process's rank under torchrun (0 otherwise: a stray RANK variable alone means nothing)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def parent_holds(folder: Path) -> bool:
    """trainer.nproc=N: the dlfs process that started torchrun holds this folder's lock for its ranks."""
    parent = os.environ.get(PARENT_ENV)
    return bool(parent and Path(parent).resolve() == folder.resolve())


def holds(folder: Path) -> bool:
    """True when this process holds the folder's lock."""
    return folder.resolve() in _held


def _try_lock(fd: int, patience_s: float = 0.5) -> bool:
    """The exclusive lock, waiting out a reader's probe (holder() holds a shared lock for a moment), never
    a writer: one holds it for its whole life."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


def release(folder: Path) -> None:
    """Give the lock back (the file stays: removing it would race with a process opening it)."""
    fd = _held.pop(folder.resolve(), None)
    if fd is not None:
        os.close(fd)


def release_all() -> None:
    """Every lock this process holds (the CLI, when its command ends: a test may run the next in-process)."""
    for folder in list(_held):
        release(folder)
    CONTINUED.clear()


def holder(folder: Path) -> str | None:
    """For readers: who is writing `folder` now (PID, host, command, since), or None."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(_read(fd))
    else:
        return None
    finally:
        os.close(fd)  # also drops the shared lock just taken


def _read(fd: int) -> dict[str, Any]:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}


def _describe(record: dict[str, Any]) -> str:
    parts = [f"PID {record.get('pid', '?')} on {record.get('host', '?')}"]
    if record.get("since"):
        parts.append(f"since {record['since']}")
    if record.get("command"):
        parts.append(f"'{record['command']}'")
    return ", ".join(parts)


def check_new_folder(folder: Path, key: str) -> None:
    """A folder a new run or sweep may write: not there yet, or empty. Anything else is refused, a run
    folder (which would be overwritten) or not (a user's own files would be mixed with the run's)."""
    if folder.exists() and not folder.is_dir():
        raise DlfsError(f"{key}={folder}: a file, not a folder; choose another {key}")
    for above in Path(os.path.abspath(folder)).parents:  # a run written inside another was hidden from dlfs runs
        if (above / "summary.json").is_file() and ((above / "config.yaml").is_file() or (above / ".hydra").is_dir()):
            raise DlfsError(f"{key}={folder} is inside the run folder {above}: choose a folder outside it")
    if not folder.is_dir():
        return
    who = holder(folder)
    if who is not None:
        raise Busy(f"{key}={folder} is being written by another dlfs process ({who}); choose another {key}")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    for marker, what in (("summary.json", "a run"), ("summary.csv", "a sweep"), ("report.json", "a reproduction")):
        if (folder / marker).exists() or (marker == "summary.csv" and any(folder.glob("*/summary.json"))):
            hint = "; to continue the run: dlfs train resume=PATH" if what == "a run" else ""
            raise DlfsError(
                f"{key}={folder} already holds {what} ({marker}); choose another {key}, nothing was written{hint}"
            )
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise DlfsError(f"{key}={folder} is not empty ({shown}); choose a new or empty folder, nothing was written")


class RunDirGuard(Callback):
    """Hydra callback: refuses an occupied output folder before Hydra writes there, then locks it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _guard(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _guard(config, "hydra.sweep.dir")


def _continued(config: DictConfig) -> bool:
    """True when this process continues a folder made for it: resume=, a rank of trainer.nproc, a torchrun
    rank other than 0 (rank 0 made the folder)."""
    run_dir = Path(str(config.hydra.run.dir)).resolve()
    if config.get("resume") is not None:
        if run_dir != Path(str(config.resume)).resolve():
            raise DlfsError("resume= continues a run in its own folder: leave hydra.run.dir out")
        return True
    if parent_holds(run_dir):
        return True
    return torchrun_rank() > 0


def _guard(config: DictConfig, key: str) -> None:
    from dlfs_cli.cli import UserError, explain  # a SystemExit: Hydra's callbacks turn any Exception into a warning

    try:
        raw = str(OmegaConf.select(config, key))
    except OmegaConfBaseException as ex:  # an interpolation that fails: ${nope}, ${oc.env:UNSET}
        raise UserError(explain(ex)) from None
    try:
        if not raw.strip():
            raise DlfsError(f"{key} is empty: give a folder, e.g. {key}=outputs/my_run")
        folder = Path(os.path.normpath(raw))  # as the file system will read it: a/../b is b
        if key == "hydra.run.dir" and _continued(config):
            if parent_holds(folder) or torchrun_rank() > 0:
                return  # the parent process, or torchrun's rank 0, holds the lock
            if not (folder / "summary.json").is_file():
                who = holder(folder)
                if who is not None:  # a run still starting: it has no summary.json yet
                    raise Busy(f"resume={folder}: the run is still being written by another dlfs process ({who})")
                return  # not a run: resume refuses it, and nothing is written there
            try:
                acquire(folder)
            except Busy as ex:
                raise Busy(
                    f"resume={folder}: the run is still being written by another dlfs process ({ex.who}); "
                    "wait for it to end, or stop it first"
                ) from None
            return
        if key == "hydra.sweep.dir" and folder.resolve() in CONTINUED and holds(folder):
            return  # resume=<sweep folder>: this process finishes the sweep, and its Optuna study goes on there
        check_new_folder(folder, key)
        subdir = OmegaConf.select(config, "hydra.output_subdir")
        if subdir:
            OUTPUT_SUBDIRS.add(Path(str(subdir)).parts[0])
        top = folder.resolve()
        while not top.parent.exists():
            top = top.parent
        try:
            folder.mkdir(parents=True)
            MADE[folder.resolve()] = top
        except FileExistsError:  # there already (empty), or another process made it a moment ago: the lock decides
            pass
        acquire(folder)
    except DlfsError as ex:
        raise UserError(str(ex)) from None
    except OSError as ex:
        raise UserError(os_error_message(ex, "cannot create the output folder")) from None


def drop_refused(folder: Path) -> None:
    """A run or sweep refused before it began leaves nothing behind: the files Hydra and the lock put into
    its folder go, and the folder too when this process made it (with the empty folders made for it).
    Only a folder whose lock this process holds: never one that another process writes."""
    if not holds(folder):
        return
    own = OWN_FILES | OUTPUT_SUBDIRS
    if not folder.is_dir() or not {p.name for p in folder.iterdir()} <= own:
        release(folder)
        return
    for name in own:  # the lock file last, while still held: nobody takes a lock on a file going away
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif name != LOCK_FILE:
            path.unlink(missing_ok=True)
    (folder / LOCK_FILE).unlink(missing_ok=True)
    release(folder)
    top = MADE.pop(folder.resolve(), None)
    if top is None:
        return
    for empty in [folder.resolve(), *folder.resolve().parents]:  # the folders made for it, while empty
        if not empty.is_relative_to(top) or any(empty.iterdir()):
            break
        empty.rmdir()
