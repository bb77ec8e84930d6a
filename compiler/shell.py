"""Making values safe for the shell scripts of a bundle."""

from __future__ import annotations

import re
import shlex

# SLURM reads #SBATCH lines itself, without a shell: values there cannot be quoted, so only
# characters SLURM takes literally are allowed (letters, digits and . _ - : / % @ + , = #).
_SBATCH_SAFE = re.compile(r"^[A-Za-z0-9._:/%@+,=#-]+$")


class UnsafeValueError(ValueError):
    """A value that cannot be placed in a generated script."""


def shell_quote(value: object) -> str:
    """Quote a value as one shell word; reject what no quoting makes readable (newlines, NUL)."""
    text = str(value)
    if "\n" in text or "\r" in text or "\0" in text:
        raise UnsafeValueError(f"{text!r} contains a line break or NUL and cannot go into a shell script")
    return shlex.quote(text)


def one_line(value: object) -> str:
    """Text for a comment line of a script: a line break would turn the rest into code."""
    text = str(value)
    if "\n" in text or "\r" in text or "\0" in text:
        raise UnsafeValueError(f"{text!r} contains a line break and cannot go into a script comment")
    return text


def sbatch_value(value: object) -> str:
    """A value for an #SBATCH line, where no quoting is possible."""
    text = str(value)
    if not _SBATCH_SAFE.match(text):
        raise UnsafeValueError(f"{text!r} cannot go on an #SBATCH line (allowed: letters, digits and ._:/%@+,=#-)")
    return text
