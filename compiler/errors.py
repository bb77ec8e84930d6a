"""Problems found in a config, and how they are shown to the user.

Every stage (load, validate, resolve) reports problems against a *key path* such as
``("datasets", 0, "type")``. Only at the edge, where the document's marks are known,
does a path become ``config.yml:12:3``; that keeps the stages free of file handling.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

KeyPath = tuple[str | int, ...]

# Exit codes, documented in the README.
EXIT_OK = 0
EXIT_DIFFERENT = 1  # verify/check/diff found a difference
EXIT_INVALID = 2  # the input is wrong: config, target, flags


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or worth a warning) in the user's input."""

    path: KeyPath
    message: str
    hint: str | None = None
    # Point at the key itself (unknown or misplaced keys) rather than at its value.
    at_key: bool = False
    # Set when the problem lies in another file than the config (a DeepSpeed JSON, a target file).
    file: str | None = None
    line: int | None = None
    column: int | None = None


class ConfigError(Exception):
    """Raised once with every problem found, so the user fixes them all in one round."""

    def __init__(self, problems: Sequence[Problem]):
        super().__init__(f"{len(problems)} problem(s)")
        self.problems = list(problems)


def format_path(path: KeyPath) -> str:
    """``("datasets", 0, "type")`` → ``datasets[0].type``. A key holding a newline or another unprintable
    character is shown quoted with escapes, so one problem stays one line; so is an empty key and one with spaces
    at its ends, which would otherwise read as no key at all."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = str(part)
            readable = name.isprintable() and name != "" and name == name.strip()
            shown = name if readable else quoted(name)
            text += f".{shown}" if text else shown
    return text or "(top level)"


def quoted(text: str) -> str:
    """TEXT in double quotes, with JSON's escapes for quotes, backslashes and C0 controls and a \\uXXXX escape for
    every other character Python does not print (C1 controls such as NEL U+0085, U+2028, unassigned code points):
    nothing a terminal or a line reader could take as a line break or a control sequence."""
    body = json.dumps(text, ensure_ascii=False)[1:-1]
    return '"' + "".join(character if character.isprintable() else _escape(character) for character in body) + '"'


def _escape(character: str) -> str:
    code = ord(character)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def suggest(word: str, choices: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The closest known name to a misspelt one, if any is close enough to be a likely typo."""
    names = sorted(set(choices))
    extensions = [name for name in names if name.startswith(word)]  # `h100` → `h100-80gb`, not `h200`
    if word and extensions:
        return min(extensions, key=len)
    matches = difflib.get_close_matches(word, names, n=1, cutoff=cutoff)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    match = suggest(word, choices)
    return f"; did you mean {match}?" if match else ""
