"""The runtime's user-facing errors: one base class, caught once in ``__main__``, printed as one line.

A ``RuntimeUserError`` is a problem the user fixes (a config, a file, a missing package) or a verdict about
the run (the watchdog stopped it); anything else is a bug and keeps its traceback. ``--debug`` shows the
traceback of user errors too. Each subclass may carry its own exit code.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_WATCHDOG = 3  # the loss or gradient went non-finite (or stayed above loss_watchdog_threshold)
# Not errors, listed here so every status launch.sh can exit with is in one place: a run stopped by a signal
# after saving a complete checkpoint exits 75 (EX_TEMPFAIL, preemption.py: run again to continue), and a node
# that cannot reach the head node's rendezvous exits 69 (EX_UNAVAILABLE, launch.sh).


class RuntimeUserError(Exception):
    """One line that names what is wrong and what to do; exits ``exit_code``."""

    exit_code = EXIT_USER_ERROR


class ConfigFileError(RuntimeUserError):
    """The file is not a run plan this runtime reads (missing, unreadable, another version, a bad key)."""
