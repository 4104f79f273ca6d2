"""Exceptions that script entry points turn into one line and an exit code (no traceback).

They live in their own module so that data, model and loop code can raise them without importing
the command-line layer. ``common.cli.run_main`` maps them to exit codes:

* ``UserError`` (and ``DataError``): something the user can fix (a path, a flag) -> exit 2, the
  code argparse uses for bad usage.
* ``Diverged``: the loss became NaN or infinite -> exit 1; the run's summary says "diverged".
* ``Interrupted`` (a ``KeyboardInterrupt``): SIGTERM or SIGHUP, handled like Ctrl-C -> exit
  128 + the signal's number (143, 129; Ctrl-C's SIGINT gives 130).
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; its message is one self-contained line saying what and how."""


class DataError(UserError):
    """CIFAR-10 files missing, truncated or malformed."""


class Diverged(RuntimeError):
    """Training produced a NaN or infinite loss; ``summary`` is the run's summary dict."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary or {}


class RunFileError(UserError):
    """A run file could not be written (disk full, read-only folder, ...); the message names the
    file and what to do."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that the run saves its status;
    ``signum`` is the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
