"""YAML text → Document: the values plus the line and column of every key and value.

Pure: takes text and a display name, never opens files. PyYAML's composer gives us the node
tree with marks; we build plain Python values from it ourselves so that we can also reject
duplicate keys (PyYAML silently keeps the last one) and read ``2e-4`` as a float (YAML 1.1
wants ``2.0e-4``; every Axolotl example writes the former).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError, KeyPath, Problem

try:  # The C parser is several times faster; fall back where libyaml is missing.
    _BaseLoader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on the PyYAML build
    _BaseLoader = yaml.SafeLoader


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe loader that reads YAML 1.2 floats such as ``2e-4`` and ``1E5`` as numbers."""


_FLOAT_12 = re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


@dataclass(frozen=True)
class Mark:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class Document:
    """A loaded YAML file: ``data`` plus where each key and value sits in the text."""

    name: str
    data: Any
    value_marks: dict[KeyPath, Mark] = field(default_factory=dict)
    key_marks: dict[KeyPath, Mark] = field(default_factory=dict)
    # Keys rewritten into tunefile's spelling → the key as the file wrote it (compiler/dialect), so that a
    # problem is shown under the name the user knows.
    written_as: dict[KeyPath, KeyPath] = field(default_factory=dict)

    def shown_path(self, path: KeyPath) -> KeyPath:
        for new, old in self.written_as.items():
            if tuple(path[:len(new)]) == new:
                return (*old, *path[len(new):])
        return tuple(path)

    def locate(self, path: KeyPath, *, at_key: bool = False) -> Mark:
        """The best mark for a path: the key or value itself, else its nearest ancestor."""
        candidates = [self.key_marks, self.value_marks] if at_key else [self.value_marks, self.key_marks]
        probe = tuple(path)
        while True:
            for marks in candidates:
                if probe in marks:
                    return marks[probe]
            if not probe:
                return Mark(1, 1)
            probe = probe[:-1]


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


def load_document(text: str, name: str) -> Document:
    """Parse YAML text; raise ConfigError with located problems for syntax errors or duplicate keys."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return Document(name=name, data={}, value_marks={(): Mark(1, 1)})
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(
            [Problem((), f"YAML syntax error: {problem}", file=name, line=line, column=column)]
        ) from None
    except yaml.YAMLError as exc:  # pragma: no cover - unmarked errors are rare
        raise ConfigError([Problem((), f"YAML error: {exc}", file=name, line=1, column=1)]) from None
    finally:
        loader.dispose()

    document = Document(name=name, data=data)
    problems: list[Problem] = []
    _record_marks(node, (), document, problems)
    if problems:
        raise ConfigError(problems)
    return document


def _record_marks(node: yaml.Node, path: KeyPath, doc: Document, problems: list[Problem]) -> None:
    doc.value_marks[path] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, Mark] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged from an anchor keep the anchor's marks
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            child = (*path, key)
            if key in seen:
                first = seen[key]
                problems.append(
                    Problem(
                        child,
                        f"duplicate key (first set on line {first.line}); YAML would silently keep the last",
                        at_key=True,
                        file=doc.name,
                        line=_mark(key_node).line,
                        column=_mark(key_node).column,
                    )
                )
                continue
            seen[key] = _mark(key_node)
            doc.key_marks[child] = _mark(key_node)
            _record_marks(value_node, child, doc, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_marks(item, (*path, index), doc, problems)
