"""What a dlfs process owes its run folder until it exits, whatever happens around it.

- **Signals.** SIGINT, SIGTERM and SIGHUP (a closed terminal, a dropped ssh session) never kill a run
  half-way: the first one is recorded, and every phase (set-up, training steps, the final evaluation,
  figures, the text sample, a sweep's summary) stops at its next safe point, saves what it must and
  exits 128 + the signal's number. A second signal aborts at once.
- **Closed outputs.** A console that went away (a pipe into `head`, a closed terminal) only loses the
  console's lines: writes to it are dropped from then on, never an error that stops a run.

No torch here: the CLI installs both before anything else runs.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from dlfs_cli.errors import DlfsError

log = logging.getLogger("dlfs")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_requested: int | None = None  # the first stop signal this process received
_listeners: list[Callable[[int], None]] = []
_installed = False


def requested() -> int | None:
    """The signal that asked this process to stop (None: none did)."""
    return _requested


def on_request(listener: Callable[[int], None]) -> Callable[[], None]:
    """Call `listener(signum)` when a stop is asked for (at once if it already was); returns the undo."""
    _listeners.append(listener)
    if _requested is not None:
        listener(_requested)
    return lambda: _listeners.remove(listener) if listener in _listeners else None


def _handle(signum: int, frame: object) -> None:
    global _requested
    if _requested is not None:
        raise Aborted(signum)
    _requested = signum
    log.warning("%s: stopping at the next safe point and saving (again to abort at once)", signal.Signals(signum).name)
    for listener in list(_listeners):
        listener(signum)


@contextmanager
def stop_signals() -> Iterator[None]:
    """Honour the stop signals inside the block. The outermost block installs the handlers (the CLI's,
    for the whole process) and, when it ends, puts the previous ones back and forgets the request (a
    test calling train() twice in one process)."""
    global _installed, _requested
    if _installed or threading.current_thread() is not threading.main_thread():  # handlers: main thread only
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in _honoured()}
    _installed = True
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _installed, _requested = False, None
        _listeners.clear()


def install_for_process() -> None:
    """The CLI: the handlers for the process's whole life (never restored: the process ends with them)."""
    global _installed
    if not _installed and threading.current_thread() is threading.main_thread():
        for s in _honoured():
            signal.signal(s, _handle)
        _installed = True


def _honoured() -> list[int]:
    """The stop signals this process has not been told to ignore (`nohup` ignores SIGHUP; a shell's
    background job ignores SIGINT): those stay ignored."""
    return [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]


def exit_code() -> int | None:
    return None if _requested is None else 128 + _requested


class Aborted(KeyboardInterrupt):
    """A second signal: stop at once (exit 128 + its number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class Stopped(DlfsError):
    """A stop signal honoured between two phases of a run; exits 128 + the signal's number."""

    def __init__(self, signum: int, phase: str, resume_hint: str = "") -> None:
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} {phase}{resume_hint}")


def check(phase: str, resume_hint: str = "") -> None:
    """Between phases: stop here when a signal asked for it."""
    if _requested is not None:
        raise Stopped(_requested, phase, resume_hint)


# --- closed outputs --------------------------------------------------------------------------

_GONE = (errno.EPIPE, errno.EIO, errno.EBADF, errno.ENXIO, errno.ECONNRESET)


class _Console:
    """sys.stdout or sys.stderr, made to outlive its reader: when a write fails because the reader went
    away, the file descriptor is pointed at /dev/null (so that the interpreter's own flush at exit is
    quiet too) and the process carries on."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.gone = False

    def _lost(self, ex: OSError) -> None:
        if ex.errno not in _GONE and not isinstance(ex, BrokenPipeError):
            raise ex
        self.gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass

    def write(self, text: str) -> int:
        if self.gone:
            return len(text)
        try:
            return self._stream.write(text)
        except OSError as ex:
            self._lost(ex)
            return len(text)
        except ValueError:  # "I/O operation on closed file": gone too
            self.gone = True
            return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.gone:
            return
        try:
            self._stream.flush()
        except OSError as ex:
            self._lost(ex)

    def isatty(self) -> bool:
        return not self.gone and self._stream.isatty()

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, buffer, ...
        return getattr(self._stream, name)


def protect_console() -> None:
    """Make stdout and stderr safe to lose (idempotent). Also: a process started with one of them closed
    (`2>&-`) gets /dev/null there, and logging never prints its own traceback about a lost console."""
    logging.raiseExceptions = False  # a handler that cannot write drops the record (train.log is its own file)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, _Console):
            continue
        if stream is None:
            stream = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
        setattr(sys, name, _Console(stream))
