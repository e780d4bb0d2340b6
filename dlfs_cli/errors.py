"""The errors a user sees as one line: `DlfsError` and the wording of the operating system's."""

from __future__ import annotations

import errno


class DlfsError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with `exit_code`."""

    exit_code = 2


def exit_code_of(ex: BaseException, default: int = 2) -> int:
    """The exit code an exception asks for: a DlfsError's (2; 128 + N for a stop by signal N, as lifecycle's
    Stopped and Aborted carry), else `default`."""
    return getattr(ex, "exit_code", default)


def os_error_message(ex: OSError, action: str = "cannot use") -> str:
    """One line naming the file and the reason, e.g. "could not write runs/x/summary.json: the disk is full"."""
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENAMETOOLONG: "the name is too long",
    }.get(ex.errno or 0, ex.strerror or type(ex).__name__)
    names = [_short(str(n)) for n in (ex.filename, ex.filename2) if n is not None]
    where = f" {' -> '.join(names)}" if names else ""
    return f"{action}{where}: {reason}"


def _short(name: str, keep: int = 120) -> str:
    """A name as long as a whole screen is shown by its two ends."""
    return name if len(name) <= keep else f"{name[: keep // 2]}...{name[-keep // 2 :]} ({len(name)} characters)"
