"""Making values safe for the shell scripts of a bundle.

Every value from the plan that reaches launch.sh or job.sbatch passes through one of these:
``shell_quote`` (one shell word, the Jinja filter ``q``), ``one_line`` (comment text),
``shell_name`` (a variable name after ``export``) or ``sbatch_value`` (an ``#SBATCH`` value).
"""

from __future__ import annotations

import re
import shlex

# SLURM reads #SBATCH lines itself, without a shell: values there cannot be quoted, so only
# characters SLURM takes literally are allowed (letters, digits and . _ - : / % @ + , = #).
_SBATCH_SAFE = re.compile(r"^[A-Za-z0-9._:/%@+,=#-]+$")
_SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class UnsafeValueError(ValueError):
    """A value that cannot be placed in a generated script."""


def breaks_line(text: str) -> bool:
    """A line feed, carriage return or NUL: a line break would turn the rest of a comment into code, and NUL
    cannot be stored in a shell word at all."""
    return any(char in text for char in "\n\r\0")


def one_line(value: object) -> str:
    """Text for one line of a script (see breaks_line)."""
    text = str(value)
    if breaks_line(text):
        raise UnsafeValueError(f"{text!r} contains a line break or NUL and cannot go into a shell script")
    return text


def shell_quote(value: object) -> str:
    """Quote a value as exactly one shell word (``shlex.quote``) after ``one_line``'s check."""
    return shlex.quote(one_line(value))


def shell_name(value: object) -> str:
    """An environment variable name for ``export NAME=…``; names cannot be quoted."""
    text = str(value)
    if not _SHELL_NAME.match(text):
        raise UnsafeValueError(f"{text!r} is not a valid environment variable name")
    return text


def sbatch_value(value: object) -> str:
    """A value for an #SBATCH line, where no quoting is possible."""
    text = str(value)
    if not _SBATCH_SAFE.match(text):
        raise UnsafeValueError(f"{text!r} cannot go on an #SBATCH line (allowed: letters, digits and ._:/%@+,=#-)")
    return text
