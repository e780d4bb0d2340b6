"""What a dlfs process owes its run folder until it exits, whatever happens around it.

- **Signals.** SIGINT, SIGTERM, SIGHUP (a closed terminal, a dropped ssh session), SIGUSR1 and SIGUSR2
  (a scheduler's warning before its time limit) never kill a run half-way: the first one is recorded,
  and every phase (set-up, training steps, the final evaluation, figures, the text sample, a sweep's
  summary) stops at its next safe point, saves what it must and exits 128 + the signal's number. A
  second signal aborts at once.
- **A sweep's worker processes** (hydra/launcher=joblib) are told to stop by the sweep's process too
  (`request`), not only by a signal of their own: a `kill PID` or a scheduler's timeout reaches the
  sweep's process alone. Only a second signal *received* aborts at once.
- **The ending.** Recording how a run ended is never cut short (`shielded`), and from the end of the
  command to the process's exit a signal still gives its exit code and line (`exit_process`).
- **Closed outputs.** A console that went away (a pipe into `head`, a closed terminal) only loses the
  console's lines: writes to it are dropped from then on, never an error that stops a run.

No torch here: the CLI installs both before anything else runs.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TextIO

from dlfs_cli.errors import DlfsError

log = logging.getLogger("dlfs")

# SIGUSR1 and SIGUSR2 are a scheduler's warning before a time limit (SLURM's --signal, submitit's default):
# by default they killed a run at once, with no last.pt of the moment and its status left `running`.
# Windows has none of SIGHUP, SIGUSR1, SIGUSR2 (dlfs refuses Windows in one line, system.py, after these imports)
STOP_NAMES = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")
STOP_SIGNALS = tuple(getattr(signal, name) for name in STOP_NAMES if hasattr(signal, name))

_requested: int | None = None  # the first stop asked of this process (a signal, or the sweep's process)
_received = False  # a stop signal was delivered to this process itself: the next one aborts
_shield = 0  # inside `shielded` blocks
_pending_abort: int | None = None  # a second signal that came inside one; it aborts at the block's end
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
    global _received, _pending_abort
    if _received:  # a second signal
        if _shield:
            _pending_abort = signum
            return
        raise Aborted(signum)
    _received = True
    request(signum)


def request(signum: int) -> None:
    """Ask this process to stop at its next safe point, as `signum` would (a signal's handler, and a sweep's
    worker told by the sweep's process); a stop already asked for is the same stop."""
    global _requested
    if _requested is not None:
        return
    _requested = signum
    log.warning("%s: stopping at the next safe point and saving (again to abort at once)", signal.Signals(signum).name)
    for listener in list(_listeners):
        listener(signum)


@contextmanager
def shielded() -> Iterator[None]:
    """A few milliseconds that a second signal must not cut: the record of how a run ended (else it could
    keep its first, wrong status). A second signal inside aborts at the block's end."""
    global _shield, _pending_abort
    _shield += 1
    try:
        yield
    finally:
        _shield -= 1
        if not _shield and _pending_abort is not None:
            signum, _pending_abort = _pending_abort, None
            raise Aborted(signum)


def _forget() -> None:
    """A new command in this process (the tests) starts with no stop asked for."""
    global _requested, _received, _pending_abort
    _requested, _received, _pending_abort = None, False, None
    _listeners.clear()


@contextmanager
def stop_signals() -> Iterator[None]:
    """Honour the stop signals inside the block. The outermost block installs the handlers (the CLI's,
    for the whole process) and, when it ends, puts the previous ones back and forgets the request (a
    test calling train() twice in one process)."""
    global _installed
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
        _installed = False
        _forget()


def install_for_process() -> None:
    """The CLI: the handlers for the process's whole life (never restored: the process ends with them)."""
    global _installed
    if not _installed and threading.current_thread() is threading.main_thread():
        for s in _honoured():
            signal.signal(s, _handle)
        _installed = True


def exit_process(code: int) -> NoReturn:
    """The end of the process's own command (`dlfs ...`, not main(args) called from Python), everything
    written: the atexit handlers run, then the process exits with `code`. Python's own finalization is
    skipped: its last garbage collection walks every object torch made (about 1 s), and it puts the
    default signal handlers back, so that a signal then killed the process without its line. A signal
    from here on ends the process at once with 128 + its number (after its line, if it is the first)."""
    if _installed:
        for s in _honoured():
            signal.signal(s, _handle_at_exit)
    try:
        # what Python's finalization does first: threads' own exit hooks (loky's, concurrent.futures'),
        # joining the threads that are not daemons, then the atexit handlers (logging's flush, ...)
        getattr(threading, "_shutdown", lambda: None)()
        atexit._run_exitfuncs()
    finally:
        if _requested is not None and code == 0:  # asked for after the command's own last check
            code = 128 + _requested
            say_stopped(code)
        _flush_console()
        os._exit(code)


def _handle_at_exit(signum: int, frame: object) -> None:
    if _requested is None:  # the first: said as the command's end says it; a second aborts without a word
        say_stopped(128 + signum)
    _flush_console()
    os._exit(128 + signum)


def say_stopped(code: int) -> None:
    """The line of a command stopped by a signal after everything was done and saved."""
    print(f"dlfs: stopped by a signal (exit {code}); everything was saved", file=sys.stderr)


def _flush_console() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


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
        if ex.errno not in _GONE and not isinstance(ex, BrokenPipeError):  # a real error (a full disk): said
            if ex.filename is None:
                ex.filename = getattr(self._stream, "name", None)  # "<stdout>": the error line names it
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
        if stream is None:  # started with the descriptor closed: /dev/null there, for the child processes too
            fd = 1 if name == "stdout" else 2  # (joblib's workers failed at their start without a stderr)
            devnull = os.open(os.devnull, os.O_WRONLY)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
            os.set_inheritable(fd, True)  # os.open's are not: it would be closed again in the children
            stream = open(fd, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 - lives as long as the process
        setattr(sys, name, _Console(stream))
