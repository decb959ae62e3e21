"""The project's own exceptions: what the `recdistill` command turns into one line with the cause and the fix.

A leaf module (it imports nothing of recdistill), so config.py, the data sources and the signal store can all derive
their errors from :class:`RecdistillError`. `recdistill.cli.main` prints ``recdistill COMMAND: <message>; fix: <fix>``
on stderr and exits with the error's `exit_code`; anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class RecdistillError(Exception):
    """An expected, user-facing failure (bad input, a missing file, a failed run), not a bug.

    `exit_code`: 1 for data, signals and runtime failures, 2 for config and argument errors. `fix`: what to do about
    it, shown after the message; a class-level default that an instance may replace.
    """

    exit_code = 1
    fix: str | None = None

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        if fix is not None:
            self.fix = fix

    def one_line(self) -> str:
        """The message on one line (a multi-line cause is joined with '; '), then '; fix: ' and the fix, if any."""
        parts = [part.strip() for part in str(self).splitlines() if part.strip()] or [type(self).__name__]
        text = parts[0]
        for part in parts[1:]:  # "invalid config:\n  a\n  b" -> "invalid config: a; b"
            text += (" " if text.endswith(":") else "; ") + part
        return f"{text}; fix: {self.fix}" if self.fix and self.fix not in text else text


class RunError(RecdistillError, RuntimeError):
    """A run cannot start or went wrong outside the data and the signal store: an unwritable run directory, a run
    directory that belongs to another run, a teacher process that failed."""


class UsageError(RecdistillError):
    """Arguments that do not fit together (what argparse cannot check by itself); exit status 2 like a config
    error."""

    exit_code = 2
